"""Stage 5, gate: rules over an eval report that fail CI, and the sample sizes that make them able to.

Modules: ``rules`` (one class per rule kind: check and power on one row), ``loader`` (the
rules file), ``checks`` (a report against rules), ``power`` (what a rule detects at n),
``planning`` (the n each rule needs), ``render`` (the tables).
"""
