"""Gate rules: parsing/validation of the rules file and evaluation on hand-built reports."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from kvcompile.eval.report import ReportError, report_from_dict
from kvcompile.gate.checks import evaluate, run_gate
from kvcompile.gate.loader import (
    GateRulesError,
    UnderpoweredRuleError,
    load_rules,
    loads_rules,
    parse_rules,
)
from kvcompile.gate.planning import plan_samples
from kvcompile.gate.render import render_table
from kvcompile.stats import Z95, largest_detected_rate, normal_power_z

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

REPORT: dict[str, Any] = {
    "format": "kvcompile-report/1",
    "kvcompile_version": "0.1.0",
    "created_with": {"python": "3.11.7", "torch": "2.13.0", "transformers": "5.23.0"},
    "seed": 0,
    "artifact": {
        "path": "artifact",
        "model_id": "default",
        "fingerprint": "sha256:ab",
        "policy": "profiled",
    },
    "kv_memory": {"context": 4096, "artifact_bytes": 123, "baseline_bytes": 984, "ratio": 0.125},
    "wall_time_s": 12.0,
    "tasks": [
        {
            "task": "passkey",
            "length": 1024,
            "n": 20,
            "baseline": {"correct": 20, "accuracy": 1.0, "ci95": [0.8389, 1.0]},
            "artifact": {"correct": 20, "accuracy": 1.0, "ci95": [0.8389, 1.0]},
            "memory_ratio": 0.5,
        },
        {
            "task": "passkey",
            "length": 4096,
            "n": 20,
            "baseline": {"correct": 20, "accuracy": 1.0, "ci95": [0.8389, 1.0]},
            "artifact": {"correct": 19, "accuracy": 0.95, "ci95": [0.7639, 0.9911]},
            "memory_ratio": 0.125,
        },
        {
            "task": "multikey",
            "length": 4096,
            "n": 20,
            "baseline": {"correct": 16, "accuracy": 0.8, "ci95": [0.5840, 0.9193]},
            "artifact": {"correct": 8, "accuracy": 0.4, "ci95": [0.2188, 0.6134]},
            "memory_ratio": 0.125,
        },
        {
            "task": "continuation",
            "length": 4096,
            "n": 4,
            "tokens": 256,
            "baseline": {"nll": 2.0},
            "artifact": {"nll": 2.03},
            "nll_increase": 0.015,
            "nll_increase_ci95": [0.005, 0.025],
            "kl": 0.021,
            "kl_ci95": [0.015, 0.027],
            "agreement": 0.93,
            "agreement_n": 256,
            "agreement_ci95": [0.89, 0.96],
            "memory_ratio": 0.125,
        },
    ],
}


def report() -> dict[str, Any]:
    return copy.deepcopy(REPORT)


# For tests of a check's verdict on REPORT's 20 cases, where a rule need not detect its
# default regression (power has its own tests below and in test_power.py).
LAX = {"allow_underpowered": True}


def gate(rules: list[dict[str, Any]], rep: dict[str, Any] | None = None):
    """The rules on a report given in its file form (read by the report's own reader)."""
    return evaluate(
        parse_rules({"format": "kvcompile-gates/1", "rules": rules}),
        report_from_dict(report() if rep is None else rep),
    )


def outcomes(rules: list[dict[str, Any]], rep: dict[str, Any] | None = None) -> list[bool]:
    return [r.passed for r in gate(rules, rep).results]


# ----------------------------------------------------------------------------- each kind


def test_min_accuracy_per_length() -> None:
    res = gate([{"task": "passkey", "min_accuracy": 0.96}]).results
    assert [(r.length, r.passed) for r in res] == [(1024, True), (4096, False)]
    assert res[1].value == pytest.approx(0.95)
    assert res[1].rule.threshold == 0.96
    assert outcomes([{"task": "passkey", "min_accuracy": 0.95}]) == [True, True]


def test_max_drop_point() -> None:
    assert outcomes([{"task": "passkey", "length": 4096, "max_drop": 0.05}]) == [True]
    res = gate([{"task": "passkey", "length": 4096, "max_drop": 0.04}])
    assert not res.passed
    assert res.results[0].value == pytest.approx(0.05)
    # "by: point" is the default
    assert outcomes([{"task": "passkey", "length": 4096, "max_drop": 0.04, "by": "point"}]) == [
        False
    ]


def test_max_drop_tolerates_float_rounding() -> None:
    rep = report()
    rep["tasks"][1]["artifact"]["accuracy"] = 0.98  # 1.0 - 0.98 == 0.020000000000000018
    assert outcomes([{"task": "passkey", "length": 4096, "max_drop": 0.02}], rep) == [True]


def test_max_drop_interval_vs_point() -> None:
    # passkey@4096: drop 0.05 > 0.02 by point, but the artifact's upper bound 0.9911 is
    # above 1.0 - 0.02 = 0.98: the drop is not statistically established.
    rule = {"task": "passkey", "length": 4096, "max_drop": 0.02}
    assert outcomes([rule]) == [False]
    res = gate([{**rule, "by": "interval", **LAX}]).results[0]
    assert res.passed and "not established" in res.detail
    # that pass is no evidence at n = 20: it detects a drop of 0.14, not the default 0.12
    with pytest.raises(UnderpoweredRuleError, match=r"detects drop >= 0\.14, not drop >= 0\.12"):
        gate([{**rule, "by": "interval"}])
    # multikey@4096: 0.8 -> 0.4; upper bound 0.6134 < 0.8 - 0.1 = 0.7: established.
    res = gate([{"task": "multikey", "max_drop": 0.1, "by": "interval"}]).results[0]
    assert not res.passed and "established" in res.detail
    assert res.value == pytest.approx(0.4)
    # ... but not against a lenient threshold: 0.6134 >= 0.8 - 0.25
    assert outcomes([{"task": "multikey", "max_drop": 0.25, "by": "interval", **LAX}]) == [True]


def test_max_drop_interval_falls_back_to_wilson_from_counts() -> None:
    rep = report()
    del rep["tasks"][2]["artifact"]["ci95"]
    del rep["tasks"][2]["artifact"]["accuracy"]  # 8/20 -> Wilson upper 0.6134
    assert outcomes([{"task": "multikey", "max_drop": 0.1, "by": "interval"}], rep) == [False]
    assert outcomes([{"task": "multikey", "max_drop": 0.19, "by": "interval", **LAX}], rep) == [True]


def test_max_nll_increase() -> None:
    res = gate([{"task": "continuation", "max_nll_increase": 0.02}]).results[0]
    assert res.passed and res.value == pytest.approx(0.015)
    assert outcomes([{"task": "continuation", "max_nll_increase": 0.01}]) == [False]


def test_max_nll_increase_from_field_when_nlls_absent() -> None:
    rep = report()
    del rep["tasks"][3]["baseline"]["nll"]
    assert outcomes([{"task": "continuation", "max_nll_increase": 0.01}], rep) == [False]
    assert outcomes([{"task": "continuation", "max_nll_increase": 0.02}], rep) == [True]


def test_max_kl_and_min_agreement() -> None:
    assert outcomes([{"task": "continuation", "max_kl": 0.05}]) == [True]
    assert outcomes([{"task": "continuation", "max_kl": 0.02}]) == [False]
    assert outcomes([{"task": "continuation", "min_agreement": 0.9}]) == [True]
    assert outcomes([{"task": "continuation", "min_agreement": 0.95}]) == [False]


def test_max_memory_ratio_top_level_and_per_row() -> None:
    res = gate([{"max_memory_ratio": 0.15}]).results
    assert len(res) == 1 and res[0].passed and res[0].value == 0.125 and res[0].length == 4096
    assert outcomes([{"max_memory_ratio": 0.1}]) == [False]
    # With a filter it checks each matching row's memory_ratio.
    assert outcomes([{"task": "passkey", "max_memory_ratio": 0.15}]) == [False, True]


def test_rule_without_task_applies_to_rows_with_the_metric() -> None:
    res = gate([{"min_accuracy": 0.5, **LAX}]).results
    assert [(r.task, r.length, r.passed) for r in res] == [
        ("multikey", 4096, False),
        ("passkey", 1024, True),
        ("passkey", 4096, True),
    ]
    assert [r.task for r in gate([{"max_kl": 1.0}]).results] == ["continuation"]


# ----------------------------------------------------------------------------- fail closed


def test_unmatched_task_fails() -> None:
    res = gate([{"task": "needle", "max_drop": 0.5}])
    assert not res.passed
    assert "no 'needle' rows" in res.results[0].detail
    assert "passkey" in res.results[0].detail  # says what is there


def test_unmatched_length_fails_but_matched_lengths_are_checked() -> None:
    res = gate([{"task": "passkey", "length": [4096, 8192], "max_drop": 0.5, **LAX}]).results
    assert [(r.length, r.passed) for r in res] == [(4096, True), (8192, False)]
    assert "length 8192" in res[1].detail and res[1].value is None


def test_no_row_with_the_metric_fails() -> None:
    rep = report()
    rep["tasks"] = [t for t in rep["tasks"] if t["task"] != "continuation"]
    res = gate([{"max_kl": 1.0}], rep)
    assert not res.passed and "max_kl" in res.results[0].detail


def test_row_missing_the_metric_fails() -> None:
    assert outcomes([{"task": "passkey", "length": 1024, "max_kl": 1.0}]) == [False]
    rep = report()
    del rep["kv_memory"]
    assert outcomes([{"max_memory_ratio": 1.0}], rep) == [False]
    rep = report()
    rep["tasks"][3]["baseline"]["nll"] = 0.0
    res = gate([{"task": "continuation", "max_nll_increase": 1.0}], rep).results[0]
    assert not res.passed and "undefined" in res.detail


def test_empty_outcome_does_not_pass() -> None:
    from kvcompile.gate.checks import GateOutcome

    assert not GateOutcome([]).passed


def test_report_of_the_wrong_format_is_an_error() -> None:
    rep = report()
    rep["format"] = "something-else/1"
    with pytest.raises(ReportError, match="format"):
        gate([{"max_memory_ratio": 1.0}], rep)


def test_overall_pass_requires_every_check() -> None:
    rules = [{"task": "passkey", "max_drop": 0.1, "detect": 0.25}, {"max_memory_ratio": 0.2}]
    assert gate(rules).passed
    assert not gate([*rules, {"task": "continuation", "max_kl": 0.001}]).passed


# ----------------------------------------------------------------------------- rules file


def bad(text: str) -> str:
    with pytest.raises(GateRulesError) as info:
        loads_rules(text)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_format() -> None:
    assert bad("rules: [{max_memory_ratio: 0.1}]").startswith("format: missing")


def test_wrong_format() -> None:
    assert bad("format: kvcompile-gates/2\nrules: [{max_memory_ratio: 0.1}]").startswith("format:")


def test_unknown_keys() -> None:
    head = "format: kvcompile-gates/1\n"
    assert bad(head + "rules: [{max_memory_ratio: 0.1}]\nextra: 1").startswith("extra: unknown key")
    msg = bad(
        head
        + "rules:\n  - {max_memory_ratio: 0.1}\n  - {task: passkey, max_drop: 0.1, tolerance: 3}"
    )
    assert msg.startswith("rules[1].tolerance: unknown key")


def test_wrong_type_names_the_path() -> None:
    msg = bad(
        "format: kvcompile-gates/1\nrules:\n  - {max_memory_ratio: 0.1}\n"
        "  - {max_kl: 0.1}\n  - {task: passkey, max_drop: abc}"
    )
    assert msg == "rules[2].max_drop: expected a number in [0, 1], got 'abc'"
    assert bad("format: kvcompile-gates/1\nrules: [{task: passkey, max_drop: true}]").startswith(
        "rules[0].max_drop: expected a number"
    )
    assert bad("format: kvcompile-gates/1\nrules: [{task: 3, max_drop: 0.1}]").startswith(
        "rules[0].task:"
    )


def test_negative_and_out_of_range_thresholds() -> None:
    head = "format: kvcompile-gates/1\nrules:\n"
    assert bad(head + "  - {task: continuation, max_kl: -0.1}").startswith(
        "rules[0].max_kl: expected a number >= 0, got -0.1"
    )
    assert bad(head + "  - {task: passkey, min_accuracy: 1.5}").startswith("rules[0].min_accuracy:")
    assert bad(head + "  - {max_memory_ratio: .nan}").startswith("rules[0].max_memory_ratio:")


def test_rule_kind_count() -> None:
    head = "format: kvcompile-gates/1\nrules:\n"
    assert "got none" in bad(head + "  - {task: passkey}")
    assert "got max_drop, max_kl" in bad(head + "  - {task: passkey, max_drop: 0.1, max_kl: 1}")


def test_by_and_length_validation() -> None:
    head = "format: kvcompile-gates/1\nrules:\n"
    assert bad(head + "  - {task: passkey, max_drop: 0.1, by: median}").startswith("rules[0].by:")
    assert bad(head + "  - {task: passkey, min_accuracy: 0.1, by: interval}").startswith(
        "rules[0].by:"
    )
    assert bad(head + "  - {task: passkey, max_drop: 0.1, length: [1024, x]}").startswith(
        "rules[0].length[1]:"
    )
    assert bad(head + "  - {task: passkey, max_drop: 0.1, length: 0}").startswith(
        "rules[0].length:"
    )
    assert bad(head + "  - {task: passkey, max_drop: 0.1, length: []}").startswith(
        "rules[0].length:"
    )


def test_empty_or_missing_rules() -> None:
    assert bad("format: kvcompile-gates/1").startswith("rules: missing")
    assert bad("format: kvcompile-gates/1\nrules: []").startswith(
        "rules: expected a non-empty list"
    )
    assert bad("- 1\n- 2").startswith("<document>:")


def test_duplicate_keys_and_invalid_yaml() -> None:
    assert "duplicate key 'max_drop'" in bad(
        "format: kvcompile-gates/1\nrules:\n  - task: passkey\n    max_drop: 0.1\n    max_drop: 0.5\n"
    )
    assert "invalid YAML" in bad("format: [unclosed\n")


def test_exponent_floats_are_numbers() -> None:
    rules = loads_rules("format: kvcompile-gates/1\nrules: [{task: continuation, max_kl: 1e-2}]")
    assert rules.rules[0].threshold == 0.01


def test_load_rules_prefixes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gates.yaml"
    path.write_text("format: kvcompile-gates/1\nrules: [{max_kl: -1}]\n")
    with pytest.raises(GateRulesError) as info:
        load_rules(path)
    assert str(info.value).startswith(f"{path}: rules[0].max_kl:")
    assert info.value.field_path == "rules[0].max_kl"
    assert isinstance(info.value, ValueError)
    with pytest.raises(GateRulesError, match="cannot read"):
        load_rules(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", ["gates.yaml", "gates-ci.yaml"])
def test_example_rules_files_are_valid(name: str) -> None:
    rules = load_rules(EXAMPLES / name)
    assert rules.rules
    assert evaluate(rules, report_from_dict(report())).results


def test_default_example_gate_on_the_sample_report() -> None:
    out = evaluate(load_rules(EXAMPLES / "gates.yaml"), report_from_dict(report()))
    failed = {(r.task, r.length) for r in out.failures}
    # passkey@4096 drops 5 points, multikey 40: both fail the 2-point rule.
    assert failed == {("passkey", 4096), ("multikey", 4096)}


# ----------------------------------------------------------------------------- rendering


def test_render_table_plain_text() -> None:
    out = gate(
        [{"task": "passkey", "max_drop": 0.02, "name": "drop [tight]"}, {"max_memory_ratio": 0.15}]
    )
    text = render_table(out)
    assert "\x1b[" not in text  # no ANSI escapes for CI logs
    assert "PASS" in text and "FAIL" in text and "drop [tight]" in text
    assert text.rstrip().endswith("gate FAILED: 1 of 3 checks failed")
    assert all(ord(c) < 128 for c in text)
    ok = render_table(gate([{"max_memory_ratio": 0.15}]))
    assert "gate PASSED: 1 checks" in ok


def test_render_table_color() -> None:
    assert "\x1b[" in render_table(gate([{"max_memory_ratio": 0.15}]), color=True)


def test_outcome_to_dict_is_json() -> None:
    data = gate([{"task": "passkey", "max_drop": 0.02}]).to_dict()
    assert json.loads(json.dumps(data))["passed"] is False
    assert data["results"][1]["length"] == 4096


def test_run_gate_from_files(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text(json.dumps(report()))
    rules = tmp_path / "rules.yaml"
    rules.write_text("format: kvcompile-gates/1\nrules: [{max_memory_ratio: 0.2}]\n")
    assert run_gate(tmp_path / "report.json", rules).passed
    assert run_gate(tmp_path / "report", rules).passed  # the stem works too


# ----------------------------------------------------------------------------- power


def _tiny_passkey_report(baseline: int, artifact: int, n: int) -> dict[str, Any]:
    rep = report()
    rep["tasks"] = [{
        "task": "passkey", "length": 1536, "n": n,
        "baseline": {"correct": baseline, "accuracy": baseline / n},
        "artifact": {"correct": artifact, "accuracy": artifact / n},
    }]
    return rep


def test_every_check_shows_what_it_detects() -> None:
    out = gate([{"task": "multikey", "max_drop": 0.1, "by": "interval"},
                {"task": "continuation", "max_kl": 0.05}, {"max_memory_ratio": 0.15}])
    multikey, kl, memory = out.results
    # baseline 16/20; the Wilson upper bound of 6/20 (0.52) is below 0.7, of 7/20 (0.57)
    # too, of 8/20 (0.61) too, of 9/20 (0.66) too, of 10/20 (0.70) not: k_fail = 9
    assert multikey.power.n == 20
    assert multikey.power.detectable == pytest.approx(0.8 - largest_detected_rate(9, 20), abs=1e-12)
    # it detects a drop of 0.42, not the default 0.1 + 0.10 (it failed, so that is no error)
    assert not multikey.power.powered and not multikey.passed
    assert multikey.detects == f"drop >= {multikey.power.detectable:.2f} (underpowered)"
    # KL: se from the stored interval [0.015, 0.027]
    assert kl.power.detectable == pytest.approx(0.05 + normal_power_z() * 0.012 / (2 * Z95), abs=1e-12)
    assert kl.power.powered  # 0.0526 <= the default 2 x 0.05
    assert memory.detects == "exact"
    text = render_table(out)
    assert "detects (power 0.8)" in text and "drop >= " in text and "KL >= 0.0" in text


def test_underpowered_rule_is_an_error_naming_n_and_the_n_it_needs() -> None:
    """The issue's case: max_drop 0.10 by interval at n = 4 from a 1/4 baseline cannot fail
    (the Wilson upper bound of 0/4 is 0.49 > 0.15). ``detect: 1.0`` asks only that it can
    fail (catch a total loss: a drop cannot exceed the baseline)."""
    rep = _tiny_passkey_report(1, 0, 4)
    rule = {"task": "passkey", "max_drop": 0.1, "by": "interval", "name": "passkey drop", "detect": 1.0}
    with pytest.raises(UnderpoweredRuleError) as info:
        gate([{"max_memory_ratio": 0.5}, rule], rep)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("rules[1]: 'passkey drop' cannot fail at n=4 on passkey@1536")
    # 0 correct must have an upper bound z²/(n + z²) below round(n/4)/n - 0.1: n = 22
    assert "needs n >= 22" in msg and "allow_underpowered" in msg
    assert info.value.exit_code == 2
    allowed = gate([{**rule, "allow_underpowered": True}], rep).results[0]
    assert allowed.passed and not allowed.power.powered and allowed.power.needed == 22
    assert allowed.detects == "nothing (underpowered)"


def test_detect_requirement() -> None:
    rep = _tiny_passkey_report(18, 18, 20)
    rule = {"task": "passkey", "max_drop": 0.15}
    assert gate([{**rule, "detect": 0.3}], rep).passed  # P(Bin(20, 0.6) <= 14) = 0.87
    with pytest.raises(UnderpoweredRuleError, match=r"detects drop >= 0\.27, not drop >= 0\.25 at n=20"):
        gate([{**rule, "detect": 0.25}], rep)
    # a check that fails has shown it can: a failure (exit 1), not a rules error
    failed = gate([{**rule, "detect": 0.25}], _tiny_passkey_report(18, 10, 20)).results[0]
    assert not failed.passed and not failed.power.powered


def test_detect_and_allow_underpowered_validation() -> None:
    head = "format: kvcompile-gates/1\nrules:\n"
    assert bad(head + "  - {task: passkey, max_drop: 0.1, detect: 0.05}").startswith(
        "rules[0].detect: must be above max_drop 0.1")
    assert bad(head + "  - {task: passkey, min_accuracy: 0.3, detect: 0.5}").startswith(
        "rules[0].detect: must be below min_accuracy 0.3")
    assert bad(head + "  - {max_memory_ratio: 0.3, detect: 0.5}").startswith("rules[0].detect:")
    assert bad(head + "  - {task: passkey, max_drop: 0.1, allow_underpowered: 1}").startswith(
        "rules[0].allow_underpowered: expected true or false")
    rules = loads_rules(head + "  - {task: continuation, min_agreement: 0.8, detect: 0.7}")
    assert rules.rules[0].detect == 0.7 and not rules.rules[0].allow_underpowered


def test_memory_rule_reads_allocated_bytes() -> None:
    rep = report()
    rep["kv_memory"].update(measured="allocated", artifact_bytes=300, baseline_bytes=1000, ratio=0.3)
    res = gate([{"max_memory_ratio": 0.2}], rep).results[0]
    assert not res.passed and res.value == pytest.approx(0.3)
    assert "allocated KV bytes 300 / 1000" in res.detail


def test_memory_rule_fails_a_report_whose_ratio_disagrees_with_its_bytes() -> None:
    rep = report()
    rep["kv_memory"].update(measured="allocated", artifact_bytes=125, baseline_bytes=1000, ratio=0.125)
    assert gate([{"max_memory_ratio": 0.2}], rep).results[0].passed  # consistent: passes
    rep["kv_memory"]["artifact_bytes"] = 100  # edited bytes: 0.1 passes either way, still refused
    res = gate([{"max_memory_ratio": 0.2}], rep).results[0]
    assert not res.passed and res.value is None and "disagrees" in res.detail


def test_plan_samples_hand_computed() -> None:
    rules = parse_rules({"format": "kvcompile-gates/1", "rules": [
        {"task": "passkey", "max_drop": 0.5, "by": "interval", "detect": 1.0},
        {"task": "passkey", "min_accuracy": 1.0, "detect": 0.5},
        {"task": "continuation", "max_kl": 0.1},
        {"max_memory_ratio": 0.2},
    ]})
    needs = plan_samples(rules, baselines=(1.0, 0.3))
    by_rule = [(n.index, n.assumes, n.needed) for n in needs]
    # z²/(n + z²) < 0.5 from n = 4; a 0.3 baseline has no room for a 0.5 drop;
    # 1 - 0.5^n >= 0.8 from n = 3; KL needs a pilot's spread; memory is exact
    assert by_rule == [(0, "baseline 1.00", 4), (0, "baseline 0.30", None), (1, "-", 3),
                       (2, "-", None), (3, "-", 0)]
    assert "pilot" in needs[3].note
    # with a pilot report: its own baselines and spreads
    pilot = report()
    pilot["tasks"][3]["cases"] = {"kl": [0.1, 0.2, 0.3, 0.4]}
    pilot["tasks"][3]["n"] = 4
    kl_rule = parse_rules({"format": "kvcompile-gates/1",
                           "rules": [{"task": "continuation", "max_kl": 0.5, "detect": 0.52}]})
    assert [n.needed for n in plan_samples(kl_rule, report_from_dict(pilot))] == [30]  # test_power.py


def test_gate_cli_underpowered_and_plan_samples(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kvcompile.cli import main

    (tmp_path / "report.json").write_text(json.dumps(_tiny_passkey_report(1, 0, 4)))
    rules = tmp_path / "rules.yaml"
    rules.write_text("format: kvcompile-gates/1\nrules:\n"
                     "  - {task: passkey, max_drop: 0.1, by: interval, detect: 1.0}\n")
    runner = CliRunner()
    result = runner.invoke(main, ["gate", str(tmp_path / "report.json"), "--rules", str(rules)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "rules[0]" in result.stderr
    assert "n=4" in result.stderr and "needs n >= 22" in result.stderr
    rules.write_text("format: kvcompile-gates/1\nrules:\n"
                     "  - {task: passkey, max_drop: 0.1, by: interval, detect: 1.0, allow_underpowered: true}\n")
    result = runner.invoke(main, ["gate", str(tmp_path / "report.json"), "--rules", str(rules)])
    assert result.exit_code == 0 and "underpowered" in result.stdout
    plan = runner.invoke(main, ["gate", "--plan-samples", str(rules)])
    assert plan.exit_code == 0 and "cases per task and length each rule needs" in plan.stdout
    piloted = runner.invoke(main, ["gate", str(tmp_path / "report.json"), "--plan-samples", str(rules)])
    assert piloted.exit_code == 0 and "pilot n=4" in piloted.stdout and "22" in piloted.stdout
    both = runner.invoke(main, ["gate", str(tmp_path / "report.json"), "--rules", str(rules),
                                "--plan-samples", str(rules)])
    assert both.exit_code == 2
    assert runner.invoke(main, ["gate", str(tmp_path / "report.json")]).exit_code == 2


# ----------------------------------------------------------------------------- rule classes


def _rows() -> dict[str, Any]:
    rows = report_from_dict(report()).rows
    return {"passkey": rows[1], "multikey": rows[2], "continuation": rows[3]}


def test_one_rule_class_per_kind_checks_a_typed_row() -> None:
    from kvcompile.gate.rules import (
        RULE_KINDS,
        MaxDrop,
        MaxKL,
        MaxMemoryRatio,
        MaxNllIncrease,
        MinAccuracy,
        MinAgreement,
    )

    assert set(RULE_KINDS) == {"min_accuracy", "max_drop", "max_nll_increase", "max_kl",
                               "min_agreement", "max_memory_ratio"}
    rows = _rows()
    passkey, cont = rows["passkey"], rows["continuation"]  # 20/20 -> 19/20; NLL 2.0 -> 2.03
    assert MinAccuracy(0, 0.95).check(passkey).passed
    assert not MinAccuracy(0, 0.96).check(passkey).passed
    drop = MaxDrop(0, 0.04).check(passkey)
    assert not drop.passed and drop.value == pytest.approx(0.05)
    assert MaxDrop(0, 0.04, by="interval").check(passkey).passed  # upper 0.9911 >= 0.96
    nll = MaxNllIncrease(0, 0.02).check(cont)
    assert nll.passed and nll.value == pytest.approx(2.03 / 2.0 - 1)
    assert not MaxKL(0, 0.02).check(cont).passed and MaxKL(0, 0.03).check(cont).passed
    assert MinAgreement(0, 0.93).check(cont).passed and not MinAgreement(0, 0.94).check(cont).passed
    assert not MaxMemoryRatio(0, 0.1, task="passkey").check(passkey).passed
    # a row without the metric fails with a reason instead of a value
    missing = MaxKL(0, 1.0).check(passkey)
    assert missing.value is None and not missing.passed and "kl" in missing.detail
    # power: binomial for accuracy rules, from the spread for continuous ones, exact for memory
    assert MaxDrop(0, 0.1).power(passkey).n == 20
    assert MaxKL(0, 0.05).power(cont).detectable == pytest.approx(
        0.05 + normal_power_z() * 0.012 / (2 * Z95), abs=1e-12)
    assert MaxMemoryRatio(0, 0.5).power(passkey).basis == "exact"


def test_results_hold_the_power_their_rule_computes() -> None:
    from kvcompile.gate.rules import MaxKL

    out = gate([{"task": "continuation", "max_kl": 0.05}])
    assert out.results[0].power == MaxKL(0, 0.05, task="continuation").power(_rows()["continuation"])


def test_exact_and_not_assessed_are_told_apart() -> None:
    """EXACT: the memory ratio, measured, not sampled. NOT_ASSESSED: a sampled check that
    failed for lack of data, whose power was never computed."""
    from kvcompile.gate.power import EXACT, NOT_ASSESSED

    assert EXACT != NOT_ASSESSED
    memory = gate([{"max_memory_ratio": 0.5}]).results[0]
    assert memory.power is EXACT and memory.detects == "exact"
    unmatched = gate([{"task": "needle", "max_kl": 0.5}]).results[0]
    assert unmatched.power is NOT_ASSESSED and unmatched.detects == "-" and not unmatched.passed
    no_metric = gate([{"task": "passkey", "length": 1024, "max_kl": 1.0}]).results[0]
    assert no_metric.power is NOT_ASSESSED


def test_a_rule_without_detect_must_detect_its_default() -> None:
    """max_drop 0.02 by interval on 4 passkeys (the original complaint about the n=4 gate):
    it can fail, but detects only a drop of 0.33, not the default 0.12: exit 2, unless
    allowed. On 60 passkeys it detects the default drop."""
    rule = {"task": "passkey", "max_drop": 0.02, "by": "interval"}
    with pytest.raises(UnderpoweredRuleError) as info:
        gate([rule], _tiny_passkey_report(4, 4, 4))
    msg = str(info.value)
    assert msg.startswith("rules[0]: 'max_drop 0.02 by interval' detects drop >= 0.33, not drop >= 0.12")
    assert "default detect" in msg and "at n=4 on passkey@1536" in msg and "needs n >= " in msg
    assert gate([{**rule, **LAX}], _tiny_passkey_report(4, 4, 4)).passed
    assert gate([rule], _tiny_passkey_report(60, 60, 60)).passed
    # an explicit detect replaces the default: a drop of 0.4 is caught at n = 4
    assert gate([{**rule, "detect": 0.4}], _tiny_passkey_report(4, 4, 4)).passed


def test_gate_cli_refuses_the_n4_gate(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kvcompile.cli import main

    (tmp_path / "report.json").write_text(json.dumps(_tiny_passkey_report(4, 4, 4)))
    rules = tmp_path / "rules.yaml"
    rules.write_text("format: kvcompile-gates/1\nrules:\n  - {task: passkey, max_drop: 0.02, by: interval}\n")
    result = CliRunner().invoke(main, ["gate", str(tmp_path / "report.json"), "--rules", str(rules)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "not drop >= 0.12" in result.stderr
    plan = CliRunner().invoke(main, ["gate", "--plan-samples", str(rules)])
    assert plan.exit_code == 0 and "default detect: drop >= 0.12" in plan.stdout


def test_a_tampered_report_is_one_line_naming_the_field(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kvcompile.cli import main

    rep = report()
    rep["tasks"][3]["n"] = "four"
    (tmp_path / "report.json").write_text(json.dumps(rep))
    rules = tmp_path / "rules.yaml"
    rules.write_text("format: kvcompile-gates/1\nrules: [{max_memory_ratio: 0.2}]\n")
    result = CliRunner().invoke(main, ["gate", str(tmp_path / "report.json"), "--rules", str(rules)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "tasks[3].n: expected an integer, got 'four'" in result.stderr


def test_memory_rules_count_values_at_one_baseline_dtype(tmp_path: Path) -> None:
    """A threshold means a ratio at ``--baseline-dtype`` (bfloat16 unless given): a report
    counted against another dtype fails every memory rule, naming both; gated at its own
    dtype it is checked, with the dtype printed beside the ratio."""
    rep = report()
    rep["kv_memory"].update(measured="allocated", artifact_bytes=125, baseline_bytes=1000,
                            ratio=0.125, baseline_dtype="float32")
    rules = [{"max_memory_ratio": 0.2}, {"task": "passkey", "max_memory_ratio": 0.6}]
    parsed = parse_rules({"format": "kvcompile-gates/1", "rules": rules})
    refused = evaluate(parsed, report_from_dict(rep)).results
    assert [r.passed for r in refused] == [False, False]
    assert all(r.value is None and "count values in float32, the rule's threshold in bfloat16"
               in r.detail for r in refused)
    checked = evaluate(parsed, report_from_dict(rep), baseline_dtype="float32").results
    assert [r.passed for r in checked] == [True, True, True]
    assert "(values in float32) 0.125 <= 0.2" in checked[0].detail
    assert all(r.detail.endswith("(vs float32)") for r in checked[1:])
    # a report that states bfloat16, or no dtype at all (older reports), gates by default
    for stated in ("bfloat16", None):
        rep["kv_memory"]["baseline_dtype"] = stated
        assert evaluate(parsed, report_from_dict(rep)).passed
    # through the CLI: the option, and a wrong one is refused by click
    from click.testing import CliRunner

    from kvcompile.cli import main

    rep["kv_memory"]["baseline_dtype"] = "float32"
    (tmp_path / "report.json").write_text(json.dumps(rep))
    (tmp_path / "rules.yaml").write_text("format: kvcompile-gates/1\nrules: [{max_memory_ratio: 0.2}]\n")
    args = ["gate", str(tmp_path / "report.json"), "--rules", str(tmp_path / "rules.yaml")]
    assert CliRunner().invoke(main, args).exit_code == 1
    passed = CliRunner().invoke(main, [*args, "--baseline-dtype", "float32"])
    assert passed.exit_code == 0 and "values in float32" in " ".join(passed.output.split())
    assert CliRunner().invoke(main, [*args, "--baseline-dtype", "int4"]).exit_code == 2
