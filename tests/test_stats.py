"""Confidence intervals: Wilson score interval and the normal-approximation mean CI."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompile.stats import Z95, mean_ci, proportion_ci, wilson_interval


def wilson_by_quadratic(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Independent derivation: the Wilson bounds are the roots p of
    (p_hat - p)^2 = z^2 p (1 - p) / n, i.e. a p^2 + b p + c = 0 with the coefficients below."""
    p_hat = k / n
    a = 1 + z * z / n
    b = -(2 * p_hat + z * z / n)
    c = p_hat * p_hat
    disc = math.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


@pytest.mark.parametrize(
    ("k", "n", "published"),
    [
        # 4-decimal values as tabulated for the 95% Wilson score interval.
        (0, 10, (0.0, 0.2775)),
        (10, 10, (0.7225, 1.0)),
        (5, 10, (0.2366, 0.7634)),
        (19, 20, (0.7639, 0.9911)),
    ],
)
def test_wilson_matches_hand_computed(k: int, n: int, published: tuple[float, float]) -> None:
    lo, hi = wilson_interval(k, n)
    ref_lo, ref_hi = wilson_by_quadratic(k, n)
    assert lo == pytest.approx(ref_lo, abs=1e-6)
    assert hi == pytest.approx(ref_hi, abs=1e-6)
    assert lo == pytest.approx(published[0], abs=1e-4)
    assert hi == pytest.approx(published[1], abs=1e-4)


def test_wilson_closed_forms_at_the_boundaries() -> None:
    # With 0 successes the upper bound is z^2 / (n + z^2); with n successes, n / (n + z^2).
    z2 = Z95**2
    assert wilson_interval(0, 10) == (0.0, pytest.approx(z2 / (10 + z2), abs=1e-12))
    assert wilson_interval(10, 10) == (pytest.approx(10 / (10 + z2), abs=1e-12), 1.0)


def test_wilson_empty_sample_is_uninformative() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(("k", "n"), [(-1, 10), (11, 10), (0, -1)])
def test_wilson_rejects_impossible_counts(k: int, n: int) -> None:
    with pytest.raises(ValueError):
        wilson_interval(k, n)


def test_wilson_rejects_bad_z() -> None:
    with pytest.raises(ValueError):
        wilson_interval(1, 2, z=0.0)


def test_wider_z_gives_wider_interval() -> None:
    lo95, hi95 = wilson_interval(7, 20)
    lo99, hi99 = wilson_interval(7, 20, z=2.5758293035489004)
    assert lo99 < lo95 and hi99 > hi95


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=5000).flatmap(
        lambda n: st.tuples(st.integers(min_value=0, max_value=n), st.just(n))
    )
)
def test_wilson_properties(kn: tuple[int, int]) -> None:
    k, n = kn
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    # Symmetry: failures' interval is the mirror image of successes' interval.
    mlo, mhi = wilson_interval(n - k, n)
    assert lo == pytest.approx(1 - mhi, abs=1e-12)
    assert hi == pytest.approx(1 - mlo, abs=1e-12)


def test_proportion_ci() -> None:
    p, lo, hi = proportion_ci(19, 20)
    assert p == 0.95
    assert (lo, hi) == wilson_interval(19, 20)
    assert proportion_ci(0, 0) == (0.0, 0.0, 1.0)


def test_mean_ci_hand_computed() -> None:
    # mean 2.5, sample sd sqrt(5/3), half-width z * sd / sqrt(4)
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = Z95 * math.sqrt(5 / 3) / 2
    assert mean == pytest.approx(2.5)
    assert lo == pytest.approx(2.5 - half, abs=1e-12)
    assert hi == pytest.approx(2.5 + half, abs=1e-12)
    assert half == pytest.approx(1.2652, abs=1e-4)


def test_mean_ci_constant_and_single_values() -> None:
    assert mean_ci([0.5] * 10) == pytest.approx((0.5, 0.5, 0.5))
    assert mean_ci([3.0]) == (3.0, 3.0, 3.0)


def test_mean_ci_accepts_generators() -> None:
    assert mean_ci(float(i) for i in range(5))[0] == pytest.approx(2.0)


@pytest.mark.parametrize("values", [[], [1.0, math.nan], [math.inf, 1.0]])
def test_mean_ci_rejects_empty_and_non_finite(values: list[float]) -> None:
    with pytest.raises(ValueError):
        mean_ci(values)
