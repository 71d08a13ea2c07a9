"""The gate's rule kinds: one small class per kind, each checking one report row.

A rule's ``check(row)`` is its verdict on one row of a :class:`~kvcompile.eval.report.Report`
(the measured value, pass or fail, and a one-line reason); ``power(row)`` is what the check
detects at the row's n (:mod:`kvcompile.gate.power` defines it). The kinds, with the key
that carries the threshold in a rules file (:mod:`kvcompile.gate.loader`):

- ``min_accuracy``: the artifact's accuracy is at least the threshold;
- ``max_drop``: baseline accuracy minus the artifact's is at most the threshold, by the
  point estimates (``by: point``) or unless the artifact's 95% upper bound establishes a
  larger drop (``by: interval``);
- ``max_nll_increase``: the artifact's continuation NLL over the baseline's, minus 1;
- ``max_kl``: the mean KL(baseline || artifact) per token;
- ``min_agreement``: the share of the baseline's greedy tokens the artifact also picks;
- ``max_memory_ratio``: the artifact's KV bytes over the source model's cache's, values
  counted at the baseline dtype (``kvcompile.memory``; bfloat16 unless ``--baseline-dtype``,
  and a report counted against another dtype fails the rule); without
  ``task``/``length`` it checks the report's memory part (:meth:`MaxMemoryRatio.check_memory`),
  with them each matching row's ratio. Measured, not sampled: its power is exact.

Comparisons tolerate float rounding (``EPS``): 1.0 - 0.98 passes ``max_drop: 0.02``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from kvcompile.eval.report import AccuracyRow, ContinuationRow, KVMemory, Row
from kvcompile.gate.power import (
    EPS,
    EXACT,
    Power,
    accuracy_power,
    continuous_power,
    standard_error,
)


@dataclass(frozen=True)
class RowCheck:
    """One rule's verdict on one row: the measured value (None: the row lacks it)."""

    value: float | None
    passed: bool
    detail: str


def _missing(detail: str) -> RowCheck:
    return RowCheck(None, False, detail)


@dataclass(frozen=True)
class Rule(ABC):
    """What every rule kind has: where it applies and what power it must have."""

    index: int  # position in the rules file (0-based, as in error messages)
    threshold: float
    task: str | None = None  # None: every row that carries the metric
    lengths: tuple[int, ...] | None = None  # None: every length the report has
    name: str | None = None  # a label for the table
    detect: float | None = None  # the regression it must detect (units of its threshold)
    allow_underpowered: bool = False

    kind: ClassVar[str]  # the rules file's key for the threshold
    bounds: ClassVar[tuple[float, float]]  # of the threshold (and of detect)
    lower_is_worse: ClassVar[bool] = False  # fails below the threshold (else above)
    sampled: ClassVar[bool] = True  # its value is an estimate from the row's cases

    @property
    def description(self) -> str:
        """Short label for tables: the user's ``name`` or ``kind threshold``."""
        return self.name or f"{self.kind} {self.threshold:g}"

    @abstractmethod
    def carries(self, row: Row) -> bool:
        """Whether ``row`` has this rule's metric (rules without ``task`` check those rows)."""

    @abstractmethod
    def check(self, row: Row) -> RowCheck:
        """The threshold check on one row."""

    @abstractmethod
    def power(self, row: Row) -> Power:
        """What the check can detect at this row's sample size."""

    def _compare(self, name: str, value: float, spec: str = ".4g") -> RowCheck:
        """The threshold check on a measured value, with its one-line reason."""
        t = self.threshold
        if self.lower_is_worse:
            ok = value >= t - EPS
            return RowCheck(value, ok, f"{name} {value:{spec}} {'>=' if ok else '<'} {t:g}")
        ok = value <= t + EPS
        return RowCheck(value, ok, f"{name} {value:{spec}} {'<=' if ok else '>'} {t:g}")


# ----------------------------------------------------------------------------- accuracy


@dataclass(frozen=True)
class AccuracyRule(Rule):
    """Right/wrong answers: exact binomial power at the row's n and baseline accuracy."""

    bounds: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def carries(self, row: Row) -> bool:
        return isinstance(row, AccuracyRow)

    @abstractmethod
    def fails(self, base_acc: float | None, art_acc: float, art_hi: float) -> bool:
        """The verdict on an artifact accuracy (and its 95% upper bound ``art_hi``): the one
        definition used both to judge a row and to find the counts that fail at a given n."""

    def power(self, row: Row) -> Power:
        if not isinstance(row, AccuracyRow) or row.n is None:
            return Power(None, None, False, None, "the row has no case count n")
        base = row.baseline.estimate(row.n)
        return accuracy_power(self, row.n, None if base is None else base.value)


@dataclass(frozen=True)
class MinAccuracy(AccuracyRule):
    kind: ClassVar[str] = "min_accuracy"
    lower_is_worse: ClassVar[bool] = True

    def fails(self, base_acc: float | None, art_acc: float, art_hi: float) -> bool:
        return art_acc < self.threshold - EPS

    def check(self, row: Row) -> RowCheck:
        art = row.artifact.estimate(row.n) if isinstance(row, AccuracyRow) else None
        if art is None:
            return _missing(f"{row.label} has no artifact accuracy")
        return self._compare("artifact accuracy", art.value)


@dataclass(frozen=True)
class MaxDrop(AccuracyRule):
    by: str = "point"  # "point" | "interval"

    kind: ClassVar[str] = "max_drop"
    BY: ClassVar[tuple[str, ...]] = ("point", "interval")

    @property
    def description(self) -> str:
        return self.name or f"{self.kind} {self.threshold:g} by {self.by}"

    def fails(self, base_acc: float | None, art_acc: float, art_hi: float) -> bool:
        assert base_acc is not None
        if self.by == "point":
            return base_acc - art_acc > self.threshold + EPS
        return art_hi < base_acc - self.threshold - EPS

    def check(self, row: Row) -> RowCheck:
        if not isinstance(row, AccuracyRow) or (art := row.artifact.estimate(row.n)) is None:
            return _missing(f"{row.label} has no artifact accuracy")
        base = row.baseline.estimate(row.n)
        if base is None:
            return _missing(f"{row.label} has no baseline accuracy")
        drop, thr = base.value - art.value, self.threshold
        if self.by == "point":
            ok = not self.fails(base.value, art.value, art.hi)
            return RowCheck(drop, ok, f"baseline {base.value:.4g} - artifact {art.value:.4g} = "
                                      f"{drop:.4g} {'<=' if ok else '>'} {thr:g}")
        if not math.isfinite(art.hi):
            return RowCheck(drop, False, f"{row.label} has no artifact interval (ci95, or correct and n)")
        ok = not self.fails(base.value, art.value, art.hi)
        verdict = "not established" if ok else "established"
        return RowCheck(drop, ok, f"drop {drop:.4g}: artifact 95% upper {art.hi:.4g} "
                                  f"{'>=' if ok else '<'} baseline - {thr:g} = {base.value - thr:.4g} "
                                  f"({verdict})")


# ----------------------------------------------------------------------------- continuation


@dataclass(frozen=True)
class ContinuousRule(Rule):
    """A mean over the row's continuations: normal-approximation power from its spread."""

    @abstractmethod
    def standard_error(self, row: ContinuationRow) -> float | None:
        """The standard error of the row's mean, from its per-case values or its interval."""

    def power(self, row: Row) -> Power:
        if not isinstance(row, ContinuationRow):
            return Power(None, None, False, None, "the row has no case count n")
        return continuous_power(self, row.n, self.standard_error(row))


@dataclass(frozen=True)
class MaxNllIncrease(ContinuousRule):
    kind: ClassVar[str] = "max_nll_increase"
    bounds: ClassVar[tuple[float, float]] = (0.0, math.inf)

    def carries(self, row: Row) -> bool:
        return isinstance(row, ContinuationRow) and (
            row.baseline.nll is not None or row.nll_increase is not None)

    def standard_error(self, row: ContinuationRow) -> float | None:
        cases = row.cases
        return standard_error(cases.artifact_nll, row.nll_increase_ci95, reference=cases.baseline_nll)

    def check(self, row: Row) -> RowCheck:
        if not isinstance(row, ContinuationRow):
            return _missing(f"{row.label}: no baseline/artifact NLL or nll_increase")
        base, art = row.baseline.nll, row.artifact.nll
        inc = row.measured_nll_increase()
        if base is not None and art is not None:
            if inc is None:
                return _missing(f"{row.label}: baseline NLL is {base:g}; a relative increase is undefined")
            how = f"NLL {base:.4f} -> {art:.4f}"
        elif inc is not None:
            how = "from nll_increase"
        else:
            return _missing(f"{row.label}: no baseline/artifact NLL or nll_increase")
        ok = inc <= self.threshold + EPS
        return RowCheck(inc, ok, f"{how}: {100 * inc:+.2f}% {'<=' if ok else '>'} {100 * self.threshold:g}%")


@dataclass(frozen=True)
class MaxKL(ContinuousRule):
    kind: ClassVar[str] = "max_kl"
    bounds: ClassVar[tuple[float, float]] = (0.0, math.inf)

    def carries(self, row: Row) -> bool:
        return isinstance(row, ContinuationRow) and row.kl is not None

    def standard_error(self, row: ContinuationRow) -> float | None:
        return standard_error(row.cases.kl, row.kl_ci95)

    def check(self, row: Row) -> RowCheck:
        if not isinstance(row, ContinuationRow) or row.kl is None:
            return _missing(f"{row.label} has no numeric kl")
        return self._compare("kl", row.kl)


@dataclass(frozen=True)
class MinAgreement(ContinuousRule):
    kind: ClassVar[str] = "min_agreement"
    bounds: ClassVar[tuple[float, float]] = (0.0, 1.0)
    lower_is_worse: ClassVar[bool] = True

    def carries(self, row: Row) -> bool:
        return isinstance(row, ContinuationRow) and row.agreement is not None

    def standard_error(self, row: ContinuationRow) -> float | None:
        return standard_error(row.cases.agreement, row.agreement_ci95)

    def check(self, row: Row) -> RowCheck:
        if not isinstance(row, ContinuationRow) or row.agreement is None:
            return _missing(f"{row.label} has no numeric agreement")
        return self._compare("agreement", row.agreement)


# ----------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MaxMemoryRatio(Rule):
    kind: ClassVar[str] = "max_memory_ratio"
    bounds: ClassVar[tuple[float, float]] = (0.0, math.inf)
    sampled: ClassVar[bool] = False

    @property
    def whole_report(self) -> bool:
        """Without task or length the rule checks the report's memory part, not its rows."""
        return self.task is None and self.lengths is None

    def carries(self, row: Row) -> bool:
        return row.memory_ratio is not None

    def check(self, row: Row) -> RowCheck:
        if row.memory_ratio is None:
            return _missing(f"{row.label} has no numeric memory_ratio")
        return self._compare("memory_ratio", row.memory_ratio)

    def check_memory(self, memory: KVMemory | None) -> RowCheck:
        """The report's KV memory: its bytes' ratio, or its stored ratio without bytes. A
        stored ratio that disagrees with the bytes (an edited or corrupt report) fails."""
        if memory is None or (ratio := memory.checked_ratio()) is None:
            if memory is not None and memory.disagrees():
                return _missing(f"kv_memory.ratio {memory.ratio:g} disagrees with its bytes "
                                f"{memory.artifact_bytes} / {memory.baseline_bytes} = "
                                f"{memory.ratio_of_bytes:.6g}: the report was edited or is corrupt; "
                                f"regenerate it with kvcompile eval")
            return _missing("report has no numeric kv_memory.ratio")
        how = "kv_memory.ratio"
        if memory.ratio_of_bytes is not None:
            what = f"{memory.measured} " if memory.measured else ""
            how = f"{what}KV bytes {memory.artifact_bytes} / {memory.baseline_bytes}"
        at = f" at context {memory.context}" if memory.context is not None else ""
        dtype = memory.baseline_dtype
        values = f" (values in {dtype})" if dtype is not None else " (baseline dtype not stated)"
        ok = ratio <= self.threshold + EPS
        return RowCheck(ratio, ok, f"{how}{at}{values} {ratio:.4g} {'<=' if ok else '>'} "
                                   f"{self.threshold:g}")

    def power(self, row: Row) -> Power:
        return EXACT


RULE_KINDS: dict[str, type[Rule]] = {
    cls.kind: cls for cls in (MinAccuracy, MaxDrop, MaxNllIncrease, MaxKL, MinAgreement, MaxMemoryRatio)
}


__all__ = [
    "RULE_KINDS",
    "AccuracyRule",
    "ContinuousRule",
    "MaxDrop",
    "MaxKL",
    "MaxMemoryRatio",
    "MaxNllIncrease",
    "MinAccuracy",
    "MinAgreement",
    "RowCheck",
    "Rule",
]
