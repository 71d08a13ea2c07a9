"""Checking a report against rules: one result per rule and report row, and the power check.

The gate fails closed: a rule that matches nothing in the report, or a report row that
lacks the number a rule needs, is a failure with a reason, never a silent pass.

Power (:mod:`kvcompile.gate.power` defines it): every result holds the :class:`Power` of its
rule on its row, the smallest regression the rule detects at the row's n. A rule that
passes without detecting its ``detect`` (or, without one, its default) makes the rules file
invalid for this report (:class:`UnderpoweredRuleError`, exit 2, naming the n it needs)
unless it says ``allow_underpowered: true``; a check that failed has shown it can fail and
is reported as a failure.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kvcompile.eval.report import Report, Row, load_report
from kvcompile.gate.loader import GateRules, UnderpoweredRuleError, load_rules
from kvcompile.gate.power import EXACT, NOT_ASSESSED, POWER, Power, describe
from kvcompile.gate.rules import MaxMemoryRatio, RowCheck, Rule
from kvcompile.memory import baseline_bytes_per_value, baseline_note


@dataclass(frozen=True)
class RuleResult:
    """One rule on one report row (or on the report's memory part, or on nothing: a failure)."""

    rule: Rule
    task: str | None
    length: int | None
    value: float | None  # measured; None when the report lacks it
    passed: bool
    detail: str
    power: Power  # what the check detects at the row's n

    @property
    def detects(self) -> str:
        """The detectable regression as table text (``exact`` for the memory ratio)."""
        if self.power.basis == "exact":
            return "exact"
        if self.power.basis == "not assessed":
            return "-"
        text = describe(self.rule.kind, self.power.detectable)
        return text if self.power.powered else f"{text} (underpowered)"

    @property
    def where(self) -> str:
        return f"{self.task or '?'}@{self.length if self.length is not None else '?'}"


@dataclass(frozen=True)
class GateOutcome:
    results: list[RuleResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True only if there is at least one check and every check passed."""
        return bool(self.results) and all(r.passed for r in self.results)

    @property
    def failures(self) -> list[RuleResult]:
        return [r for r in self.results if not r.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "results": [
            {"index": r.rule.index, "rule": r.rule.description, "kind": r.rule.kind,
             "threshold": r.rule.threshold, "task": r.task, "length": r.length, "value": r.value,
             "passed": r.passed, "detail": r.detail, "power": asdict(r.power)}
            for r in self.results]}


def _unchecked(rule: Rule, task: str | None, length: int | None, detail: str) -> RuleResult:
    """A check that fails for lack of data: no power to assess (the memory ratio's is exact)."""
    return RuleResult(rule, task, length, None, False, detail, NOT_ASSESSED if rule.sampled else EXACT)


def _on_row(rule: Rule, row: Row) -> RuleResult:
    check = rule.check(row)
    assessed = check.value is not None or not rule.sampled  # else it failed for lack of data
    power = rule.power(row) if assessed else NOT_ASSESSED
    return RuleResult(rule, row.task, row.length, check.value, check.passed, check.detail, power)


def check_rule(rule: Rule, report: Report, baseline_dtype: str = "bfloat16") -> list[RuleResult]:
    """``rule`` on every row it selects (by task, length, or the metric), sorted by task and
    length; a failure for each length it names that the report lacks. A memory rule's
    threshold counts values at ``baseline_dtype``: a report whose ratios count another fails."""
    if isinstance(rule, MaxMemoryRatio):
        stated = report.memory.baseline_dtype if report.memory is not None else None
        if stated is not None and stated != baseline_dtype:
            return [_unchecked(rule, rule.task, None,
                               f"the report's memory ratios count values in {stated}, the rule's "
                               f"threshold in {baseline_dtype}: rerun kvcompile eval "
                               f"--baseline-dtype {baseline_dtype}, or gate with --baseline-dtype "
                               f"{stated}")]
    if isinstance(rule, MaxMemoryRatio) and rule.whole_report:
        memory = report.memory
        check: RowCheck = rule.check_memory(memory)
        context = memory.context if memory is not None else None
        return [RuleResult(rule, None, context, check.value, check.passed, check.detail, EXACT)]

    rows = report.rows
    if rule.task is not None:
        candidates = [r for r in rows if r.task == rule.task]
        if not candidates:
            present = sorted({r.task for r in rows}) or ["none"]
            return [_unchecked(rule, rule.task, None, f"no {rule.task!r} rows in the report "
                                                      f"(tasks present: {', '.join(present)})")]
    else:
        candidates = [r for r in rows if rule.carries(r)]
        if not candidates:
            return [_unchecked(rule, None, None, f"no report row carries the metric of {rule.kind}")]

    what = f"{rule.task!r} row" if rule.task is not None else f"row with {rule.kind} data"
    selected: list[Row] = []
    missing: list[RuleResult] = []
    if rule.lengths is None:
        selected = candidates
    else:
        for length in rule.lengths:
            at_length = [r for r in candidates if r.length == length]
            if not at_length:
                have = sorted({r.length for r in candidates})
                missing.append(_unchecked(rule, rule.task, length,
                                          f"no {what} at length {length} in the report "
                                          f"(lengths present: {', '.join(map(str, have)) or 'none'})"))
            selected += at_length
    out = sorted((_on_row(rule, row) for row in selected), key=lambda r: (r.task or "", r.length or 0))
    if isinstance(rule, MaxMemoryRatio) and baseline_dtype != "bfloat16":
        out = [replace(r, detail=r.detail + baseline_note(baseline_dtype)) for r in out]
    return out + missing


def evaluate(rules: GateRules, report: Report, baseline_dtype: str = "bfloat16") -> GateOutcome:
    """Check every rule against the report; one :class:`RuleResult` per rule and row
    (memory thresholds count values at ``baseline_dtype``, :func:`check_rule`).

    Raises :class:`UnderpoweredRuleError` if a rule that passes does not detect what it must
    at the report's n and does not say ``allow_underpowered: true``.
    """
    results: list[RuleResult] = []
    for rule in rules.rules:
        results += check_rule(rule, report, baseline_dtype)
    check_power(rules, results)
    return GateOutcome(results)


def check_power(rules: GateRules, results: list[RuleResult]) -> None:
    """Raise :class:`UnderpoweredRuleError` for the first underpowered pass not allowed to be.

    Only passing checks count: a pass is evidence only if the check could have failed; a
    check that failed has shown that it can, and the gate reports the failure (exit 1).
    """
    weak = [r for r in results if r.passed and not r.power.powered and not r.rule.allow_underpowered]
    if not weak:
        return
    first = weak[0]
    power = first.power
    more = f" ({len(weak) - 1} more underpowered checks)" if len(weak) > 1 else ""
    raise UnderpoweredRuleError(
        f"rules[{first.rule.index}]",
        f"{first.rule.description!r} {power.reason} at n={power.n} on {first.where} "
        f"(power {POWER:g}); {power.remedy}, or set allow_underpowered: true{more}",
        rules.source,
    )


def run_gate(
    report_path: str | os.PathLike[str], rules_path: str | os.PathLike[str],
    baseline_dtype: str = "bfloat16",
) -> GateOutcome:
    """Load both files and evaluate: what ``kvcompile gate REPORT --rules RULES`` does."""
    baseline_bytes_per_value(baseline_dtype)  # one line naming the choices
    rules = load_rules(rules_path)
    return evaluate(rules, load_report(report_path), baseline_dtype)


__all__ = ["GateOutcome", "RuleResult", "check_power", "check_rule", "evaluate", "run_gate"]
