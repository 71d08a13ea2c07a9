"""Power of gate rules (kvcompile/gate/power.py) against hand-computed binomial and normal cases."""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest

from kvcompile.eval.report import ContinuationCases, ContinuationRow
from kvcompile.gate.power import accuracy_needed, accuracy_power, standard_error
from kvcompile.gate.rules import RULE_KINDS, Rule
from kvcompile.stats import (
    Z95,
    binomial_cdf,
    largest_detected_rate,
    normal_power_z,
    relative_increase_ci,
)

Z80 = 0.8416212335729143  # P(Z <= z) = 0.8, tabulated


def R(kind: str, threshold: float, by: str = "point", detect: float | None = None) -> Any:
    """A rule of ``kind`` as the rules file makes it (the gate's own rule classes)."""
    extra = {"by": by} if kind == "max_drop" else {}
    rule: Rule = RULE_KINDS[kind](0, threshold, detect=detect, **extra)
    return rule


def row(n: int | None, **fields: Any) -> ContinuationRow:
    """A continuation row with per-case values ``cases`` (a dict) and other fields."""
    cases = ContinuationCases(**{k: tuple(v) for k, v in fields.pop("cases", {}).items()})
    return ContinuationRow("continuation", 1024, n, cases=cases, **fields)


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
    0.75 - (1 - 0.8^(1/4)) = 0.696. It can fail, but not detect its default drop 0.20."""
    power = accuracy_power(R("max_drop", 0.10, "interval"), 4, 0.75)
    assert not power.powered and power.reason.startswith("detects drop >= 0.70, not drop >= 0.20")
    assert power.detectable == pytest.approx(0.75 - (1 - 0.8 ** 0.25), abs=1e-9)
    assert power.detectable == pytest.approx(0.6957, abs=1e-4)
    # it detects drops of 0.696 and more: asked to catch 0.70 it is powered, 0.69 it is not
    assert accuracy_power(R("max_drop", 0.10, "interval", detect=0.70), 4, 0.75).powered
    assert not accuracy_power(R("max_drop", 0.10, "interval", detect=0.69), 4, 0.75).powered


def test_a_rule_that_cannot_fail_and_the_n_it_needs() -> None:
    """max_drop 0.5 by interval from a perfect baseline: it fails only when the artifact's
    upper bound z²/(n + z²) (0 correct) is below 0.5, i.e. n > z² = 3.84: not at n = 3.
    ``detect 1.0``: it must only catch a total loss, so it is powered once it can fail."""
    rule = R("max_drop", 0.5, "interval", detect=1.0)
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
    kl_row = row(4, cases={"kl": [0.1, 0.2, 0.3, 0.4]})
    se = math.sqrt(0.05 / 3) / 2
    assert R("max_kl", 0.5).standard_error(kl_row) == pytest.approx(se, abs=1e-12)
    power = R("max_kl", 0.5).power(kl_row)
    assert power.powered and power.detectable == pytest.approx(0.5 + Z80 * se, abs=1e-9)
    # detect 0.52: n >= 4 (z se / 0.02)^2 = 29.5 -> 30
    weak = R("max_kl", 0.5, detect=0.52).power(kl_row)
    assert not weak.powered and weak.needed == 30
    assert math.ceil(4 * (Z80 * se / 0.02) ** 2) == 30


def test_agreement_rule_that_cannot_fail() -> None:
    """min_agreement 0.05 with se 0.0645: 0.05 - 0.84 se < 0, no true agreement is caught
    with 0.8; it needs n >= 4 (z se / 0.05)^2 = 4.7 -> 5."""
    agree = row(4, cases={"agreement": [0.9, 0.8, 1.0, 0.7]})
    power = R("min_agreement", 0.05).power(agree)
    assert not power.powered and power.detectable is None and power.needed == 5
    assert R("min_agreement", 0.5).power(agree).powered


def test_nll_rule_falls_back_to_the_stored_interval() -> None:
    stored = row(6, nll_increase_ci95=(0.01, 0.03))
    se = 0.02 / (2 * Z95)
    power = R("max_nll_increase", 0.05).power(stored)
    assert power.detectable == pytest.approx(0.05 + Z80 * se, abs=1e-9)
    cases = {"artifact_nll": [2.2, 2.0, 3.3], "baseline_nll": [2.0, 2.0, 3.0]}
    with_cases = row(3, cases=cases, nll_increase_ci95=(0.0, 9.0))
    lo, hi = relative_increase_ci(cases["artifact_nll"], cases["baseline_nll"])[1:]
    assert R("max_nll_increase", 0.05).standard_error(with_cases) == pytest.approx((hi - lo) / (2 * Z95))
    assert standard_error(cases["artifact_nll"], None, cases["baseline_nll"]) == pytest.approx(
        (hi - lo) / (2 * Z95))


def test_continuous_rules_need_two_cases_and_a_spread() -> None:
    one = R("max_kl", 0.1).power(row(1, cases={"kl": [0.3]}))
    assert not one.powered and one.needed == 2
    blind = R("max_kl", 0.1).power(row(8))
    assert not blind.powered and blind.needed is None and "re-run" in blind.remedy


# ----------------------------------------------------------------------------- default detect


def test_default_detect_per_kind() -> None:
    """Without detect a rule must catch a regression derived from its threshold (power.py)."""
    from kvcompile.gate.power import default_detect, required_detect

    assert default_detect("max_drop", 0.02) == pytest.approx(0.12)
    assert default_detect("max_drop", 0.95) == 1.0  # a drop of at most everything
    assert default_detect("min_accuracy", 0.7) == pytest.approx(0.6)
    assert default_detect("min_accuracy", 0.05) == 0.0
    assert default_detect("max_nll_increase", 0.03) == pytest.approx(0.06)
    assert default_detect("max_kl", 0.05) == pytest.approx(0.10)
    assert default_detect("min_agreement", 0.85) == pytest.approx(0.70)  # 1 - 2 x 0.15
    assert default_detect("min_agreement", 0.3) == 0.0
    with pytest.raises(ValueError, match="measured"):
        default_detect("max_memory_ratio", 0.5)
    assert required_detect(R("max_kl", 0.05)) == pytest.approx(0.10)
    assert required_detect(R("max_kl", 0.05, detect=0.07)) == 0.07


def test_the_n4_passkey_gate_is_underpowered_by_default() -> None:
    """The original complaint: max_drop 0.02 by interval on 4 perfect passkeys can fail (3 of 4
    has a Wilson upper bound 0.95 < 0.98) but detects only a drop of 1 - 0.2^(1/4) = 0.33
    (1 - p^4 >= 0.8), not its default 0.12."""
    rule = R("max_drop", 0.02, "interval")
    power = accuracy_power(rule, 4, 1.0)
    assert power.detectable == pytest.approx(1 - 0.2 ** 0.25, abs=1e-9)
    assert not power.powered
    assert power.reason.startswith("detects drop >= 0.33, not drop >= 0.12 (the default detect")
    assert power.needed is not None and power.needed > 4
    assert accuracy_power(rule, power.needed, 1.0).powered
    # the same rule asked only to catch a total loss passes at n = 4, as before the default
    assert accuracy_power(R("max_drop", 0.02, "interval", detect=1.0), 4, 1.0).powered


def test_continuous_default_is_twice_the_threshold() -> None:
    """max_kl 0.05 with se 0.04: detects 0.05 + 0.8416 x 0.04 = 0.0837 <= 0.10 (powered);
    with se 0.06 it detects 0.1005 > 0.10 (not)."""
    def kl_row(se: float) -> ContinuationRow:
        return row(8, kl=0.03, kl_ci95=(0.03 - Z95 * se, 0.03 + Z95 * se))

    assert R("max_kl", 0.05).power(kl_row(0.04)).powered
    weak = R("max_kl", 0.05).power(kl_row(0.06))
    assert not weak.powered and weak.detectable == pytest.approx(0.05 + Z80 * 0.06, abs=1e-9)
    assert "not KL >= 0.1 (the default detect" in weak.reason
    # agreement 0.85: must catch 0.70; with se 0.2 it detects 0.85 - 0.168 = 0.68 < 0.70
    agree = row(8, agreement=0.9, agreement_ci95=(0.9 - Z95 * 0.2, 0.9 + Z95 * 0.2))
    assert not R("min_agreement", 0.85).power(agree).powered
    assert R("min_agreement", 0.85, detect=0.65).power(agree).powered


# ----------------------------------------------------------------------------- sample sizes


def _point_drop_meets(n: int, base: Fraction, threshold: Fraction, detect: Fraction) -> bool:
    """Exact reference for a point max_drop: the baseline's count at n is round(base·n); the
    failing counts are those with drop > threshold; the rule meets its requirement when the
    true accuracy base_n - detect fails with probability >= 0.8."""
    base_correct = round(base * n)
    k_fail = max((k for k in range(n + 1) if Fraction(base_correct - k, n) > threshold), default=-1)
    target = max(Fraction(0), Fraction(base_correct, n) - detect)
    return k_fail >= 0 and exact_cdf(k_fail, n, target) >= Fraction(8, 10)


def test_samples_needed_hold_at_every_n_up_to_twice_that() -> None:
    """Item 8: the saw-tooth guard. max_drop 0.15 / detect 0.25 / baseline 0.9 meets its
    requirement at n = 12 but not at 14-16 or 20-21: the answer is 22, the smallest n from
    which every n up to 2n meets it (a guard-less search would answer 12)."""
    def meets(n: int) -> bool:
        return _point_drop_meets(n, Fraction(9, 10), Fraction(15, 100), Fraction(25, 100))

    assert meets(12) and not meets(14) and not meets(21)
    reference = next(n for n in range(1, 200) if all(meets(m) for m in range(n, 2 * n + 1)))
    assert reference == 22
    rule = R("max_drop", 0.15, detect=0.25)
    assert accuracy_needed(rule, 0.9) == reference
    assert [accuracy_power(rule, n, 0.9).powered for n in range(1, 45)] == [meets(n) for n in range(1, 45)]


def test_baseline_counts_carried_to_other_n_are_rounded() -> None:
    """A baseline accuracy carried to another n is round(base·n) correct answers, not the
    truncation: 0.29·100 is 28.999999999999996 in floats, and 2/3 of 4 cases is 3 (2.67)."""
    assert int(0.29 * 100) == 28  # what truncation would take
    power = accuracy_power(R("max_drop", 0.1), 100, 0.29)
    # 29 correct: drop (29 - k)/100 > 0.1 fails for k <= 18
    assert power.detectable == pytest.approx(0.29 - largest_detected_rate(18, 100), abs=1e-12)
    rule = R("max_drop", 0.2, detect=0.35)

    def meets(n: int) -> bool:
        return _point_drop_meets(n, Fraction(2, 3), Fraction(2, 10), Fraction(35, 100))

    assert not meets(7)  # 5 of 7 (4.67 rounded): truncated to 4 it would meet

    assert [accuracy_power(rule, n, 2 / 3).powered for n in range(1, 40)] == [meets(n) for n in range(1, 40)]
    reference = next(n for n in range(1, 200) if all(meets(m) for m in range(n, 2 * n + 1)))
    assert accuracy_needed(rule, 2 / 3) == reference


def test_continuous_samples_needed_is_the_smallest_n_that_detects() -> None:
    """max_kl 0.5 / detect 0.52 on 4 cases with se 0.0642: z·se·sqrt(4/m) <= 0.02 from
    m >= 4 (z·se / 0.02)² = 29.2, so 30 (not 29: rounding to the nearest would miss it).
    Checked on rows of 29 and 30 cases with the spread carried over (se·sqrt(4/m))."""
    se = 0.02 * math.sqrt(29.2 / 4) / Z80
    assert 4 * (Z80 * se / 0.02) ** 2 == pytest.approx(29.2)

    def kl_row(n: int) -> ContinuationRow:
        s = se * math.sqrt(4 / n)
        return row(n, kl=0.4, kl_ci95=(0.4 - Z95 * s, 0.4 + Z95 * s))

    rule = R("max_kl", 0.5, detect=0.52)
    assert not rule.power(kl_row(29)).powered and rule.power(kl_row(30)).powered
    assert rule.power(kl_row(4)).needed == 30
    # a rule that is powered at its n still says from which n it would be
    assert rule.power(kl_row(60)).needed == 30
