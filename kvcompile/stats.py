"""Confidence intervals for evaluation reports.

Every number in a report comes with its uncertainty, so that a CI gate can tell a real
regression from sampling noise on a small eval. Pure Python (no numpy/scipy): the gate
and the report renderer must not pull in heavy dependencies.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

Z95 = 1.959963984540054
"""Two-sided 95% quantile of the standard normal distribution."""


def _check_z(z: float) -> None:
    if not (math.isfinite(z) and z > 0):
        raise ValueError(f"z must be a positive finite number, got {z!r}")


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% (by default) Wilson score interval for a binomial proportion.

    Wilson rather than the normal approximation because evals are small (n = 10..100)
    and accuracies sit near 0 or 1, where the normal interval collapses to zero width.
    ``n = 0`` carries no information and gives the whole range ``(0.0, 1.0)``.
    """
    if isinstance(successes, bool) or isinstance(n, bool):
        raise TypeError("successes and n must be integers, not bool")
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    _check_z(z)
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = (z / denom) * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    # At the boundaries the formula is exact in theory; pin it so rounding never
    # reports e.g. a lower bound of 1e-17 for 0 successes.
    lo = 0.0 if successes == 0 else max(0.0, center - half)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return lo, hi


def proportion_ci(successes: int, n: int, z: float = Z95) -> tuple[float, float, float]:
    """``(p, lo, hi)``: the point estimate with its Wilson interval (``p = 0`` when ``n = 0``)."""
    lo, hi = wilson_interval(successes, n, z)
    return (successes / n if n else 0.0), lo, hi


def mean_ci(values: Iterable[float], z: float = Z95) -> tuple[float, float, float]:
    """``(mean, lo, hi)`` with a normal-approximation interval ``mean ± z·s/√n``.

    For continuous per-token metrics (KL, NLL) where n is in the hundreds, so the normal
    approximation is adequate. ``s`` is the sample standard deviation (ddof = 1). With a
    single value the spread is unknown and the interval degenerates to the value itself;
    callers report ``n`` alongside. Non-finite values are rejected rather than silently
    turning the whole report into NaN.
    """
    _check_z(z)
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci needs at least one value")
    if not all(math.isfinite(x) for x in xs):
        raise ValueError("mean_ci got a non-finite value (nan or inf)")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, mean, mean
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    half = z * math.sqrt(var / n)
    return mean, mean - half, mean + half
