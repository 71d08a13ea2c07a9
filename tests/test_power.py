"""Power of gate rules (kvcompile/gate/power.py) against hand-computed binomial and normal cases."""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import pytest

from kvcompile.gate.power import accuracy_needed, accuracy_power, continuous_power, standard_error
from kvcompile.stats import (
    Z95,
    binomial_cdf,
    largest_detected_rate,
    normal_power_z,
    relative_increase_ci,
)

Z80 = 0.8416212335729143  # P(Z <= z) = 0.8, tabulated


@dataclass(frozen=True)
class R:
    kind: str
    threshold: float
    by: str = "point"
    detect: float | None = None


def exact_cdf(k: int, n: int, p: Fraction) -> Fraction:
    return sum((math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1)), Fraction(0))


@pytest.mark.parametrize(("k", "n", "p"), [(0, 4, "1/4"), (3, 10, "1/2"), (14, 20, "13/20"),
                                            (9, 10, "9/10"), (40, 100, "1/3")])
def test_binomial_cdf_is_the_exact_sum(k: int, n: int, p: str) -> None:
    assert binomial_cdf(k, n, float(Fraction(p))) == pytest.approx(float(exact_cdf(k, n, Fraction(p))),
                                                                   abs=1e-12)


def test_binomial_cdf_edges() -> None:
    assert binomial_cdf(-1, 5, 0.5) == 0.0
    assert binomial_cdf(5, 5, 0.5) == 1.0
    assert binomial_cdf(0, 5, 0.0) == 1.0 and binomial_cdf(4, 5, 1.0) == 0.0


def test_largest_detected_rate_closed_forms() -> None:
    # k_fail = 0: P(X = 0) = (1 - p)^n = 0.8; k_fail = n - 1: 1 - p^n = 0.8
    assert largest_detected_rate(0, 4) == pytest.approx(1 - 0.8 ** 0.25, abs=1e-9)
    assert largest_detected_rate(9, 10) == pytest.approx(0.2 ** 0.1, abs=1e-9)
    assert largest_detected_rate(-1, 10) is None
    assert largest_detected_rate(10, 10) == 1.0


def test_normal_power_z_is_the_tabulated_quantile() -> None:
    assert normal_power_z(0.8) == pytest.approx(Z80, abs=1e-12)


# ----------------------------------------------------------------------------- accuracy rules


def test_the_issue_example_interval_rule_at_n4() -> None:
    """max_drop 0.10 by interval, n = 4, baseline 3/4: the Wilson upper bound of 1/4 is
    0.70 > 0.65, of 0/4 is 0.49 < 0.65, so only 0/4 fails: the rule detects a drop of
    0.75 - (1 - 0.8^(1/4)) = 0.696, and can fail."""
    power = accuracy_power(R("max_drop", 0.10, "interval"), 4, 0.75)
    assert power.powered
    assert power.detectable == pytest.approx(0.75 - (1 - 0.8 ** 0.25), abs=1e-9)
    assert power.detectable == pytest.approx(0.6957, abs=1e-4)


def test_a_rule_that_cannot_fail_and_the_n_it_needs() -> None:
    """max_drop 0.5 by interval from a perfect baseline: it fails only when the artifact's
    upper bound z²/(n + z²) (0 correct) is below 0.5, i.e. n > z² = 3.84: not at n = 3."""
    rule = R("max_drop", 0.5, "interval")
    assert Z95**2 / (3 + Z95**2) > 0.5 > Z95**2 / (4 + Z95**2)
    power = accuracy_power(rule, 3, 1.0)
    assert not power.powered and power.detectable is None and power.reason == "cannot fail"
    assert power.needed == 4
    assert accuracy_power(rule, 4, 1.0).powered
    # a baseline at the threshold leaves no room for a drop at any n
    assert accuracy_needed(R("max_drop", 0.3), 0.3) is None


def test_point_rule_with_detect() -> None:
    """max_drop 0.15 by point, baseline 18/20: 14 correct (drop 0.20) fails, 15 (0.15) does
    not. Detecting a 0.30 drop means P(Bin(20, 0.60) <= 14) >= 0.8; 0.25 would need
    P(Bin(20, 0.65) <= 14) >= 0.8."""
    p30 = exact_cdf(14, 20, Fraction(60, 100))
    p25 = exact_cdf(14, 20, Fraction(65, 100))
    assert p30 > Fraction(8, 10) > p25  # 0.874 and 0.755
    assert accuracy_power(R("max_drop", 0.15, detect=0.30), 20, 0.9).powered
    weak = accuracy_power(R("max_drop", 0.15, detect=0.25), 20, 0.9)
    assert not weak.powered and weak.reason.startswith("detects drop >= 0.27")
    # the detectable drop itself: 0.9 - p* with P(Bin(20, p*) <= 14) = 0.8
    p_star = 0.9 - accuracy_power(R("max_drop", 0.15), 20, 0.9).detectable
    assert float(exact_cdf(14, 20, Fraction(p_star))) == pytest.approx(0.8, abs=1e-9)
    # samples for detect 0.25: whole counts make the power saw-tooth (n = 12 meets it, 20
    # does not), so the answer is the smallest n from which every n up to 2n meets it

    def meets(n: int) -> bool:
        base = round(0.9 * n)
        k_fail = max((k for k in range(n + 1) if (base - k) / n > 0.15 + 1e-9), default=-1)
        return k_fail >= 0 and exact_cdf(k_fail, n, Fraction(base, n) - Fraction(1, 4)) >= Fraction(8, 10)

    assert meets(12) and not meets(20)
    needed = weak.needed
    assert needed is not None and needed > 20
    assert all(meets(n) for n in range(needed, 2 * needed + 1))
    assert not all(meets(n) for n in range(needed - 1, 2 * needed - 1))


def test_min_accuracy_closed_form() -> None:
    """min_accuracy 1.0 fails on any miss (k_fail = n - 1): detects p <= 0.2^(1/n); with
    detect 0.5 it needs 1 - 0.5^n >= 0.8, i.e. n = 3."""
    power = accuracy_power(R("min_accuracy", 1.0), 10, None)
    assert power.detectable == pytest.approx(0.2 ** 0.1, abs=1e-9)
    assert accuracy_needed(R("min_accuracy", 1.0, detect=0.5), 1.0) == 3
    assert not accuracy_power(R("min_accuracy", 1.0, detect=0.5), 2, None).powered
    # a floor of 0 cannot fail
    assert not accuracy_power(R("min_accuracy", 0.0), 50, None).powered


# ----------------------------------------------------------------------------- continuous rules


def test_relative_increase_ci_hand_computed() -> None:
    # R = 7.5 / 7 ; residuals t - R b = (0.4/7, -1/7, 0.6/7); se = sqrt(sum e² / (n (n-1))) / (7/3)
    inc, lo, hi = relative_increase_ci([2.2, 2.0, 3.3], [2.0, 2.0, 3.0])
    se = math.sqrt((0.16 + 1 + 0.36) / 49 / 6) / (7 / 3)
    assert inc == pytest.approx(0.5 / 7, abs=1e-12)
    assert (lo, hi) == pytest.approx((inc - Z95 * se, inc + Z95 * se), abs=1e-12)
    assert se == pytest.approx(0.030816, abs=1e-6)


def test_kl_rule_from_per_case_values() -> None:
    # sd of (0.1, 0.2, 0.3, 0.4) = sqrt(0.05 / 3); se = sd / 2
    row = {"task": "continuation", "n": 4, "cases": {"kl": [0.1, 0.2, 0.3, 0.4]}}
    se = math.sqrt(0.05 / 3) / 2
    assert standard_error("max_kl", row) == pytest.approx(se, abs=1e-12)
    power = continuous_power(R("max_kl", 0.5), row)
    assert power.powered and power.detectable == pytest.approx(0.5 + Z80 * se, abs=1e-9)
    # detect 0.52: n >= 4 (z se / 0.02)^2 = 29.5 -> 30
    weak = continuous_power(R("max_kl", 0.5, detect=0.52), row)
    assert not weak.powered and weak.needed == 30
    assert math.ceil(4 * (Z80 * se / 0.02) ** 2) == 30


def test_agreement_rule_that_cannot_fail() -> None:
    """min_agreement 0.05 with se 0.0645: 0.05 - 0.84 se < 0, no true agreement is caught
    with 0.8; it needs n >= 4 (z se / 0.05)^2 = 4.7 -> 5."""
    row = {"task": "continuation", "n": 4, "cases": {"agreement": [0.9, 0.8, 1.0, 0.7]}}
    power = continuous_power(R("min_agreement", 0.05), row)
    assert not power.powered and power.detectable is None and power.needed == 5
    assert continuous_power(R("min_agreement", 0.5), row).powered


def test_nll_rule_falls_back_to_the_stored_interval() -> None:
    row = {"task": "continuation", "n": 6, "nll_increase_ci95": [0.01, 0.03]}
    se = 0.02 / (2 * Z95)
    power = continuous_power(R("max_nll_increase", 0.05), row)
    assert power.detectable == pytest.approx(0.05 + Z80 * se, abs=1e-9)
    cases = {"artifact_nll": [2.2, 2.0, 3.3], "baseline_nll": [2.0, 2.0, 3.0]}
    with_cases = {"task": "continuation", "n": 3, "cases": cases, "nll_increase_ci95": [0, 9]}
    lo, hi = relative_increase_ci(cases["artifact_nll"], cases["baseline_nll"])[1:]
    assert standard_error("max_nll_increase", with_cases) == pytest.approx((hi - lo) / (2 * Z95))


def test_continuous_rules_need_two_cases_and_a_spread() -> None:
    one = continuous_power(R("max_kl", 0.1), {"n": 1, "cases": {"kl": [0.3]}})
    assert not one.powered and one.needed == 2
    blind = continuous_power(R("max_kl", 0.1), {"n": 8})
    assert not blind.powered and blind.needed is None and "re-run" in blind.remedy
