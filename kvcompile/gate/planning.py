"""Sizing an eval before running it: the cases each rule needs (``kvcompile gate --plan-samples``).

With a pilot report (any n), every rule is sized on the rows it checks there: the pilot's
baseline accuracies and per-case spreads. Without one, accuracy rules are sized for
assumed baseline accuracies; NLL, KL and agreement rules need a pilot (their spread is
unknown); the memory ratio needs no samples. The sizes are those of
:mod:`kvcompile.gate.power` ("Samples needed").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvcompile.eval.report import Report
from kvcompile.gate.checks import check_rule
from kvcompile.gate.loader import GateRules
from kvcompile.gate.power import MAX_SAMPLES, accuracy_needed, default_detect, describe
from kvcompile.gate.rules import AccuracyRule, MinAccuracy, Rule

PLAN_BASELINES = (1.0, 0.9, 0.8, 0.6)  # baseline accuracies assumed without a pilot report


@dataclass(frozen=True)
class SampleNeed:
    """The cases per task and length one rule needs, under a stated assumption."""

    index: int
    rule: str
    task: str | None
    length: int | None
    assumes: str
    needed: int | None  # None: see ``note``
    note: str = ""


def plan_samples(
    rules: GateRules,
    pilot: Report | None = None,
    baselines: tuple[float, ...] = PLAN_BASELINES,
) -> list[SampleNeed]:
    """The n each rule needs to meet its power requirement (see the module docstring)."""
    needs: list[SampleNeed] = []
    if pilot is not None:
        for rule in rules.rules:
            for r in check_rule(rule, pilot):
                need = SampleNeed(rule.index, rule.description, r.task, r.length, "-", None)
                if r.power.basis == "exact":
                    needs.append(replace(need, needed=0, note="exact"))
                elif r.power.basis == "not assessed":
                    needs.append(replace(need, note=r.detail))
                else:
                    note = "" if r.power.needed is not None else f"no n up to {MAX_SAMPLES}"
                    needs.append(replace(need, assumes=f"pilot n={r.power.n}", needed=r.power.needed,
                                       note=note))
        return needs
    for rule in rules.rules:
        for length in rule.lengths or (None,):
            needs += _plan_without_pilot(rule, length, baselines)
    return needs


def _plan_without_pilot(
    rule: Rule, length: int | None, baselines: tuple[float, ...]
) -> list[SampleNeed]:
    def need(assumes: str, n: int | None, note: str = "") -> SampleNeed:
        return SampleNeed(rule.index, rule.description, rule.task, length, assumes, n, note)

    if not rule.sampled:
        return [need("-", 0, "exact")]
    if not isinstance(rule, AccuracyRule):
        return [need("-", None, "needs a pilot report (per-case spread)")]
    if isinstance(rule, MinAccuracy):
        n = accuracy_needed(rule, 1.0)
        return [need("-", n, f"no n up to {MAX_SAMPLES}" if n is None else _default_note(rule))]
    out = []
    for base in baselines:
        n = accuracy_needed(rule, base)
        note = "" if n is not None else "the baseline leaves no room for the drop"
        out.append(need(f"baseline {base:.2f}", n, note or _default_note(rule)))
    return out


def _default_note(rule: Rule) -> str:
    if rule.detect is not None:
        return ""
    return f"default detect: {describe(rule.kind, default_detect(rule.kind, rule.threshold))}"


__all__ = ["PLAN_BASELINES", "SampleNeed", "plan_samples"]
