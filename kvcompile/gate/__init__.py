"""Stage 5, gate: rules over an eval report that fail CI, and the sample sizes that make them able to."""
