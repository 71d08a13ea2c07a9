"""What a gate rule can detect at a report's sample size, and how many samples it needs.

A rule is evidence only if it can fail on the regressions it claims to catch. Definitions
(``POWER`` = 0.8; intervals are the 95% ones of :mod:`kvcompile.stats`):

**Detects.** A rule detects a regression when it fails on it with probability at least
``POWER`` over the draw of the eval cases. Its *detectable regression* on one report row is
the smallest regression it detects at that row's n, in the unit of what the rule measures:

- ``max_drop`` / ``min_accuracy`` (exact binomial): the artifact's correct count is
  ``Binomial(n, p)``; the baseline's accuracy is taken as observed, ``p_b = k_b / n``.
  Applying the rule's own check to every possible count ``k = 0..n`` (the point difference
  ``p_b - k/n``, or the Wilson upper bound of ``k/n`` for ``by: interval``, or ``k/n``
  against the floor) gives ``k_fail``, the largest count that fails. ``p*`` is the largest
  ``p`` with ``P(Binomial(n, p) <= k_fail) >= POWER``. ``max_drop`` detects drops of
  ``p_b - p*`` and more; ``min_accuracy`` detects accuracies of ``p*`` and less. No failing
  count (``k_fail < 0``): the rule cannot fail at this n.
- ``max_nll_increase`` / ``max_kl`` / ``min_agreement`` (normal approximation): the measured
  value is a mean over the row's n cases with standard error ``se``, from the row's
  per-case values (``cases``; the same statistics as its ``*_ci95``), or in a report without
  them from its 95% interval, ``se = half-width / 1.96`` (:func:`standard_error`). A check at
  threshold ``t`` fails with probability ``POWER`` when the true value is ``t + z·se``
  (``z = 0.8416``), or ``t - z·se`` for agreement, which cannot go below 0. With fewer than
  2 cases there is no ``se`` and the rule counts as unable to fail.
- ``max_memory_ratio``: measured, not sampled (:data:`EXACT`): it detects any ratio above
  its threshold.

**Requirement.** A rule must detect ``detect`` (a drop, an accuracy, an increase, a KL or an
agreement, in the units of its threshold). Without ``detect`` it must detect the default
regression its threshold implies (:func:`default_detect`):

- ``max_drop t``: a drop of ``t + 0.10`` (ten points beyond what the rule allows; 1 at
  most, and no more than the baseline: a drop to accuracy 0);
- ``min_accuracy t``: an accuracy of ``t - 0.10`` (ten points below the floor; 0 at least);
- ``max_nll_increase t`` / ``max_kl t``: twice the threshold's distance from the
  baseline's value 0, ``2t`` (a threshold of 0 needs an explicit ``detect``);
- ``min_agreement t``: twice its distance from the baseline's agreement 1, ``1 - 2(1 - t)``
  (0 at least: then it must only be able to fail).

A rule that passes while falling short is an error of the rules file, unless it says
``allow_underpowered: true`` (a check that failed needs no power).

**Samples needed.** The smallest n (at most ``MAX_SAMPLES``) from which the rule meets its
requirement, with the row's baseline accuracy (accuracy rules: ``round(p_b·m)`` correct
answers at m cases) or its per-case spread (``se`` scaling as ``1/√n``) carried over to the
new n. Whole counts make the binomial
power saw-tooth in n, so for accuracy rules it is the smallest n from which the requirement
holds at every n up to twice that.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from kvcompile.stats import (
    POWER,
    Z95,
    binomial_cdf,
    largest_detected_rate,
    mean_ci,
    normal_power_z,
    relative_increase_ci,
    wilson_interval,
)

Basis = Literal["sampled", "exact", "not assessed"]

MAX_SAMPLES = 5000
EPS = 1e-9  # comparisons tolerate float rounding: 1.0 - 0.98 must pass max_drop 0.02
DEFAULT_ACCURACY_MARGIN = 0.10  # default detect of accuracy rules: ten points past the threshold


class RuleLike(Protocol):
    """What the power definitions read of a rule (:mod:`kvcompile.gate.rules`)."""

    kind: str
    threshold: float
    detect: float | None
    lower_is_worse: bool  # fails below its threshold (else above)


class AccuracyRuleLike(RuleLike, Protocol):
    def fails(self, base_acc: float | None, art_acc: float, art_hi: float) -> bool:
        """The rule's verdict on one row: the artifact's accuracy and its 95% upper bound."""
        ...


def default_detect(kind: str, threshold: float) -> float:
    """The regression a rule without ``detect`` must catch (the module docstring's rule)."""
    if kind == "max_drop":
        return min(1.0, threshold + DEFAULT_ACCURACY_MARGIN)
    if kind == "min_accuracy":
        return max(0.0, threshold - DEFAULT_ACCURACY_MARGIN)
    if kind in ("max_nll_increase", "max_kl"):
        return 2 * threshold
    if kind == "min_agreement":
        return max(0.0, 1.0 - 2 * (1.0 - threshold))
    raise ValueError(f"{kind} is measured, not sampled: it has no detect")


def required_detect(rule: RuleLike) -> float:
    """What ``rule`` must detect: its ``detect``, else :func:`default_detect`."""
    return rule.detect if rule.detect is not None else default_detect(rule.kind, rule.threshold)


@dataclass(frozen=True)
class Power:
    """One rule on one report row: what it detects at the row's n and what n it needs."""

    n: int | None
    detectable: float | None  # in the rule's units; None: it detects nothing at this n
    powered: bool  # meets its requirement (can fail, or detects ``detect``)
    needed: int | None  # smallest n that meets it (above n when n does not); None: none
    reason: str = ""  # why it is not powered
    basis: Basis = "sampled"  # "exact": measured, not sampled; "not assessed": no data to assess

    @property
    def remedy(self) -> str:
        """What would make the rule powered, for the error message."""
        if self.needed is not None:
            return f"needs n >= {self.needed}: raise --samples"
        if self.n is None or self.reason.startswith("no standard error"):
            return "re-run `kvcompile eval`, which records per-case values and intervals"
        return f"no n up to {MAX_SAMPLES} is enough at this baseline: loosen the rule"


EXACT = Power(None, None, True, None, basis="exact")  # measured, not sampled (the memory ratio)
# a check that failed for lack of data (no row, no metric): it needs no power, none is computed
NOT_ASSESSED = Power(None, None, True, None, basis="not assessed")


def _k_fail(rule: AccuracyRuleLike, n: int, base_correct: int) -> int:
    """Largest correct count out of ``n`` that fails ``rule`` (-1: none fails).

    Applies the rule's own check (``rule.fails``, the one the gate judges a report with).
    Every check fails on fewer correct answers whenever it fails on more, so the failing
    counts are ``0..k_fail``: found by bisection.
    """
    base_acc = base_correct / n

    def fails(k: int) -> bool:
        return rule.fails(base_acc, k / n, wilson_interval(k, n)[1])

    if not fails(0):
        return -1
    lo, hi = 0, n + 1  # fails(lo), not fails(hi) (n + 1: sentinel)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid <= n and fails(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _target(rule: RuleLike, base_acc: float) -> float:
    """The true artifact accuracy the rule must catch (:func:`required_detect`)."""
    detect = required_detect(rule)
    if rule.kind == "min_accuracy":
        return detect
    return max(0.0, base_acc - detect)  # a drop cannot exceed the baseline


def _shortfall(rule: RuleLike, detectable: float | None) -> str:
    """Why a rule is underpowered: what it detects against what it must."""
    if detectable is None:
        return "cannot fail"
    must = describe(rule.kind, required_detect(rule))
    default = "" if rule.detect is not None else " (the default detect; set detect: to choose)"
    return f"detects {describe(rule.kind, detectable)}, not {must}{default}"


def _meets(rule: AccuracyRuleLike, n: int, base_acc: float) -> bool:
    """Whether an accuracy rule at ``n`` cases meets its requirement (one binomial sum)."""
    base_correct = round(base_acc * n)
    k_fail = _k_fail(rule, n, base_correct)
    if k_fail < 0:
        return False
    return binomial_cdf(k_fail, n, _target(rule, base_correct / n)) >= POWER - 1e-12


def accuracy_power(rule: AccuracyRuleLike, n: int, base_acc: float | None) -> Power:
    """Power of ``min_accuracy`` / ``max_drop`` at ``n`` cases and baseline accuracy ``base_acc``."""
    if rule.kind == "max_drop" and base_acc is None:
        return Power(n, None, False, None, "has no baseline accuracy to drop from")
    base = 1.0 if base_acc is None else base_acc  # min_accuracy does not read the baseline
    if n < 1:
        return Power(n, None, False, accuracy_needed(rule, base), "no cases")
    base_correct = round(base * n)
    rate = largest_detected_rate(_k_fail(rule, n, base_correct), n)
    detectable = None
    if rate is not None:
        detectable = rate if rule.kind == "min_accuracy" else base_correct / n - rate
    if _meets(rule, n, base):
        return Power(n, detectable, True, accuracy_needed(rule, base))
    return Power(n, detectable, False, accuracy_needed(rule, base, above=n), _shortfall(rule, detectable))


def accuracy_needed(rule: AccuracyRuleLike, base_acc: float, above: int = 0) -> int | None:
    """Samples an accuracy rule needs at this baseline accuracy (None: none up to MAX_SAMPLES).

    Counts are whole, so the power of a rule saw-tooths with n (a point rule at n = 12 can
    beat n = 20). The answer is the smallest n (greater than ``above``) from which the rule
    meets its requirement at every n up to twice that (or up to MAX_SAMPLES), so that
    "n >= needed" is advice that holds.
    """
    critical = rule.threshold if rule.kind == "min_accuracy" else base_acc - rule.threshold
    if _target(rule, base_acc) >= critical - EPS:  # not even n -> infinity separates them
        return None
    start = None
    for n in range(above + 1, MAX_SAMPLES + 1):
        if not _meets(rule, n, base_acc):
            start = None
        elif start is None:
            start = n
        if start is not None and n >= min(2 * start, MAX_SAMPLES):
            return start
    return None


def standard_error(
    values: Sequence[float] | None,
    stored: tuple[float, float] | None,
    reference: Sequence[float] | None = None,
) -> float | None:
    """Standard error of a row's mean from its per-case ``values`` (2 or more), else from its
    ``stored`` 95% interval; with ``reference`` values (the baseline's NLLs) the mean is the
    paired relative increase ``mean(values) / mean(reference) - 1``. None without either."""
    interval = None
    if values is not None and len(values) >= 2:
        if reference is None:
            interval = mean_ci(values)[1:]
        elif len(reference) == len(values) and sum(reference) > 0:
            interval = relative_increase_ci(values, reference)[1:]
    if interval is None:
        if stored is None:
            return None
        interval = stored
    return (interval[1] - interval[0]) / (2 * Z95)


def continuous_power(rule: RuleLike, n: int | None, se: float | None) -> Power:
    """Power of ``max_nll_increase`` / ``max_kl`` / ``min_agreement`` on a row of ``n`` cases
    whose mean has standard error ``se`` (:func:`standard_error`)."""
    if n is None:
        return Power(None, None, False, None, "has no case count n")
    if n < 2:
        return Power(n, None, False, 2, "has no spread: one case")
    if se is None:
        return Power(n, None, False, None, "no standard error: the row has neither per-case "
                     "values nor a 95% interval for it")
    z = normal_power_z(POWER)
    lower = rule.lower_is_worse
    detectable: float | None = rule.threshold - z * se if lower else rule.threshold + z * se
    if lower and detectable is not None and detectable < 0:
        detectable = None  # agreement cannot go below 0
    detect = required_detect(rule)
    powered = detectable is not None and (
        detectable >= detect - EPS if lower else detectable <= detect + EPS)
    gap = abs(rule.threshold - detect)
    needed: int | None = None  # se shrinks as 1/sqrt(n): z·se·sqrt(n/m) <= gap from m on
    if gap > 0:
        needed = max(2, math.ceil(n * (z * se / gap) ** 2))
    if needed is not None and needed > MAX_SAMPLES:
        needed = None
    return Power(n, detectable, powered, needed, "" if powered else _shortfall(rule, detectable))


def describe(kind: str, value: float | None) -> str:
    """``drop >= 0.32``, ``accuracy <= 0.25``, ``NLL >= +3.1%``, ``KL >= 0.12``, ..."""
    if value is None:
        return "nothing"
    if kind == "max_drop":
        return f"drop >= {value:.2f}"
    if kind == "min_accuracy":
        return f"accuracy <= {value:.2f}"
    if kind == "max_nll_increase":
        return f"NLL >= {100 * value:+.1f}%"
    if kind == "max_kl":
        return f"KL >= {value:.3g}"
    if kind == "min_agreement":
        return f"agreement <= {value:.2f}"
    return f"ratio > {value:.4g}"


__all__ = [
    "DEFAULT_ACCURACY_MARGIN",
    "EXACT",
    "MAX_SAMPLES",
    "NOT_ASSESSED",
    "POWER",
    "Power",
    "accuracy_needed",
    "accuracy_power",
    "continuous_power",
    "default_detect",
    "describe",
    "required_detect",
    "standard_error",
]
