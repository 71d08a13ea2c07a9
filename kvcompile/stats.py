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


def nll_increase(value: float, baseline: float) -> float:
    """Relative NLL increase over the baseline's: ``value / baseline - 1`` (0 = as good).
    Here rather than in ``metrics`` so that reading a report needs no torch."""
    return value / baseline - 1


def relative_increase_ci(
    treated: Iterable[float], reference: Iterable[float], z: float = Z95
) -> tuple[float, float, float]:
    """``(r, lo, hi)`` for ``r = mean(treated) / mean(reference) - 1`` over paired cases.

    The relative NLL increase of the artifact over the baseline on the same cases. The
    interval is the ratio estimator's delta-method one: ``se = sd(t_i - R·b_i) / (√n · mean(b))``
    with ``R = mean(t) / mean(b)``; pairing removes the case-to-case spread both systems
    share (a hard text is hard for both), which an interval on each mean would keep.
    """
    _check_z(z)
    ts, bs = [float(v) for v in treated], [float(v) for v in reference]
    if len(ts) != len(bs) or not ts:
        raise ValueError(f"need the same non-zero number of paired values, got {len(ts)} and {len(bs)}")
    if not all(math.isfinite(x) for x in ts + bs):
        raise ValueError("relative_increase_ci got a non-finite value (nan or inf)")
    n = len(ts)
    mean_b = math.fsum(bs) / n
    if mean_b <= 0:
        raise ValueError(f"the reference mean must be positive, got {mean_b!r}")
    ratio = math.fsum(ts) / n / mean_b
    if n == 1:
        return ratio - 1, ratio - 1, ratio - 1
    residuals = [t - ratio * b for t, b in zip(ts, bs, strict=True)]
    se = math.sqrt(math.fsum(e * e for e in residuals) / (n - 1) / n) / mean_b
    return ratio - 1, ratio - 1 - z * se, ratio - 1 + z * se


# ----------------------------------------------------------------------------- power

POWER = 0.8
"""Probability with which a rule must fail on a regression for it to count as detected."""


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, p)``, summed term by term (log-space, no overflow)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_odds = math.log(p) - math.log1p(-p)
    log_term = n * math.log1p(-p)  # log P(X = 0)
    terms = [math.exp(log_term)]
    for i in range(k):  # log P(X = i + 1) from log P(X = i)
        log_term += math.log((n - i) / (i + 1)) + log_odds
        terms.append(math.exp(log_term))
    return min(1.0, math.fsum(terms))


def largest_detected_rate(k_fail: int, n: int, power: float = POWER) -> float | None:
    """The largest true success rate ``p`` at which ``P(Binomial(n, p) <= k_fail) >= power``.

    A check that fails whenever the observed count is at most ``k_fail`` catches every true
    rate at or below this one with at least ``power``. None when no count fails
    (``k_fail < 0``): then no true rate, not even 0, is caught. The CDF falls as ``p``
    rises, so bisection finds the crossing (to 1e-12).
    """
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    if k_fail < 0:
        return None
    if k_fail >= n:
        return 1.0
    lo, hi = 0.0, 1.0  # cdf(lo) >= power > cdf(hi)
    while hi - lo > 1e-12:
        mid = (lo + hi) / 2
        if binomial_cdf(k_fail, n, mid) >= power:
            lo = mid
        else:
            hi = mid
    return lo


def normal_power_z(power: float = POWER) -> float:
    """``z`` with ``P(Z <= z) = power``: a one-sided check at ``c`` on an estimate with standard
    error ``se`` fails with probability ``power`` when the true value is ``c + z·se``."""
    from statistics import NormalDist

    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    return NormalDist().inv_cdf(power)
