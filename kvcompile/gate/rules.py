"""CI gates: a rules file (``kvcompile-gates/1``) checked against an eval report.

The gate fails closed: a rule that matches nothing in the report, or a report row that
lacks the number a rule needs, is a failure with a reason, never a silent pass.

Rules file::

    format: kvcompile-gates/1
    rules:
      - {task: passkey, max_drop: 0.02}            # by: point (default)
      - {task: multikey, length: [4096, 8192], max_drop: 0.05, by: interval}
      - {task: passkey, min_accuracy: 0.9}
      - {task: continuation, max_nll_increase: 0.02}
      - {task: continuation, max_kl: 0.05}
      - {task: continuation, min_agreement: 0.8}
      - {max_memory_ratio: 0.15}
      - {name: "short contexts stay exact", task: passkey, length: 1024, max_drop: 0}
      - {task: passkey, max_drop: 0.15, detect: 0.4}     # must catch a 40-point drop
      - {task: multikey, min_accuracy: 0.3, allow_underpowered: true}

Each rule has exactly one kind key (the threshold) plus optional ``task``, ``length``
(int or list; omitted = every length the report has for the task), ``by`` (``max_drop``
only), ``name`` (a label for the table), ``detect`` and ``allow_underpowered``. A rule
without ``task`` applies to every row that carries its metric. ``max_memory_ratio``
without task/length checks the report's ``kv_memory.ratio`` (allocated KV bytes of the
artifact over the uncompressed baseline's); with a filter it checks each matching row's
``memory_ratio``. Rule indices in error messages are 0-based.

Power (:mod:`kvcompile.gate.power` defines it): on every row the gate also computes the smallest
regression the rule detects at the row's n, and prints it. A rule that passes although it
cannot fail at that n (or, with ``detect: x``, does not detect ``x``) makes the rules file
invalid for this report (:class:`UnderpoweredRuleError`, exit 2, naming the n it needs)
unless it says ``allow_underpowered: true``; a check that failed has shown it can fail and
is reported as a failure. :func:`plan_samples` gives the n each rule needs.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

import yaml

from kvcompile.errors import KVCompileError
from kvcompile.eval.report import (
    ReportError,
    accuracy_of,
    check_report,
    is_accuracy_row,
    row_label,
)
from kvcompile.gate.power import (
    ACCURACY_KINDS,
    CONTINUOUS_KINDS,
    EPS,
    EXACT,
    MAX_SAMPLES,
    NOT_ASSESSED,
    POWER,
    Power,
    accuracy_fails,
    accuracy_needed,
    accuracy_power,
    continuous_power,
    describe,
)

GATES_FORMAT = "kvcompile-gates/1"
_EPS = EPS

# kind -> (lower bound, upper bound) of the threshold
KINDS: dict[str, tuple[float, float]] = {
    "min_accuracy": (0.0, 1.0),
    "max_drop": (0.0, 1.0),
    "max_nll_increase": (0.0, math.inf),
    "max_kl": (0.0, math.inf),
    "min_agreement": (0.0, 1.0),
    "max_memory_ratio": (0.0, math.inf),
}
_RULE_KEYS = frozenset(KINDS) | {"task", "length", "by", "name", "detect", "allow_underpowered"}
_BY = ("point", "interval")


class GateRulesError(KVCompileError, ValueError):
    """An invalid rules file; the message is one line naming the field by path."""

    def __init__(self, field_path: str, message: str, source: str | None = None) -> None:
        self.field_path = field_path
        self.message = message
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(f"{prefix}{field_path}: {message}")


class UnderpoweredRuleError(GateRulesError):
    """A rule that cannot fail (or detect its ``detect``) at the report's sample size."""


# ----------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    index: int
    kind: str
    threshold: float
    task: str | None = None
    lengths: tuple[int, ...] | None = None
    by: str = "point"
    name: str | None = None
    detect: float | None = None  # the regression it must detect (units of its threshold)
    allow_underpowered: bool = False

    @property
    def description(self) -> str:
        """Short label for tables: the user's ``name`` or ``kind threshold [by …]``."""
        if self.name:
            return self.name
        text = f"{self.kind} {self.threshold:g}"
        if self.kind == "max_drop":
            text += f" by {self.by}"
        return text


@dataclass(frozen=True)
class GateRules:
    rules: tuple[Rule, ...]
    source: str | None = None
    format: str = GATES_FORMAT


class _RulesLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads ``1e-2`` as a float (YAML 1.2)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {line})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_RulesLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


_Err = Callable[[str, str], NoReturn]


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return repr(value)


def _bounds_text(lo: float, hi: float) -> str:
    return f"a number in [{lo:g}, {hi:g}]" if math.isfinite(hi) else f"a number >= {lo:g}"


def _parse_threshold(value: Any, lo: float, hi: float, where: str, err: _Err) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and math.isfinite(value) and lo <= value <= hi:
        return float(value)
    err(where, f"expected {_bounds_text(lo, hi)}, got {_describe(value)}")


def _parse_lengths(value: Any, where: str, err: _Err) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        err(where, "expected a positive integer or a non-empty list of them, got []")
    out: list[int] = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]" if isinstance(value, list) else where
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            err(at, f"expected a positive integer, got {_describe(item)}")
        if item in out:
            err(at, f"duplicate length {item}")
        out.append(item)
    return tuple(out)


def _parse_detect(
    raw: Mapping[str, Any], kind: str, threshold: float, at: str, err: _Err
) -> float | None:
    """``detect`` lies on the failing side of the threshold, in the threshold's units."""
    if "detect" not in raw:
        return None
    where = f"{at}.detect"
    if kind == "max_memory_ratio":
        err(where, "the memory ratio is measured, not sampled: remove detect")
    lo, hi = KINDS[kind]
    value = _parse_threshold(raw["detect"], lo, hi, where, err)
    if kind in ("min_accuracy", "min_agreement") and not value < threshold:
        err(where, f"must be below {kind} {threshold:g} (an {kind[4:]} the rule must catch)")
    if kind not in ("min_accuracy", "min_agreement") and not value > threshold:
        err(where, f"must be above {kind} {threshold:g} (a regression the rule must catch)")
    return value


def parse_rules(data: Any, *, source: str | None = None) -> GateRules:
    """Validate a parsed rules document; raise :class:`GateRulesError` on the first problem."""

    def err(where: str, message: str) -> NoReturn:
        raise GateRulesError(where, message, source)

    if not isinstance(data, Mapping):
        err("<document>", f"expected a mapping with 'format' and 'rules', got {_describe(data)}")
    for key in data:
        if key not in ("format", "rules"):
            err(str(key), "unknown key (expected 'format' and 'rules')")
    if "format" not in data:
        err("format", f"missing (expected {GATES_FORMAT!r})")
    if data["format"] != GATES_FORMAT:
        err("format", f"expected {GATES_FORMAT!r}, got {_describe(data['format'])}")
    if "rules" not in data:
        err("rules", "missing (expected a non-empty list of rules)")
    raw_rules = data["rules"]
    if not isinstance(raw_rules, list) or not raw_rules:
        err("rules", f"expected a non-empty list of rules, got {_describe(raw_rules)}")

    rules: list[Rule] = []
    for i, raw in enumerate(raw_rules):
        at = f"rules[{i}]"
        if not isinstance(raw, Mapping):
            err(at, f"expected a mapping, got {_describe(raw)}")
        for key in raw:
            if key not in _RULE_KEYS:
                err(f"{at}.{key}", f"unknown key (allowed: {', '.join(sorted(_RULE_KEYS))})")
        kinds = [k for k in KINDS if k in raw]
        if len(kinds) != 1:
            got = ", ".join(kinds) if kinds else "none"
            err(at, f"expected exactly one of {', '.join(KINDS)}; got {got}")
        kind = kinds[0]
        threshold = _parse_threshold(raw[kind], *KINDS[kind], f"{at}.{kind}", err)
        task = raw.get("task")
        if "task" in raw and (not isinstance(task, str) or not task.strip()):
            err(f"{at}.task", f"expected a task name, got {_describe(task)}")
        lengths = _parse_lengths(raw["length"], f"{at}.length", err) if "length" in raw else None
        by = raw.get("by", "point")
        if "by" in raw and kind != "max_drop":
            err(f"{at}.by", f"only valid with max_drop, not {kind}")
        if by not in _BY:
            err(f"{at}.by", f"expected 'point' or 'interval', got {_describe(by)}")
        name = raw.get("name")
        if "name" in raw and not isinstance(name, str):
            err(f"{at}.name", f"expected a string, got {_describe(name)}")
        detect = _parse_detect(raw, kind, threshold, at, err)
        allow = raw.get("allow_underpowered", False)
        if not isinstance(allow, bool):
            err(f"{at}.allow_underpowered", f"expected true or false, got {_describe(allow)}")
        rules.append(Rule(i, kind, threshold, task, lengths, by, name, detect, allow))
    return GateRules(tuple(rules), source)


def load_rules(path: str | os.PathLike[str]) -> GateRules:
    """Read and validate a YAML rules file."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise GateRulesError("<file>", f"cannot read: {exc.strerror or exc}", source) from None
    return loads_rules(text, source=source)


def loads_rules(text: str, *, source: str | None = None) -> GateRules:
    """Parse rules from YAML text (for tests and for rules embedded elsewhere)."""
    try:
        data = yaml.load(io.StringIO(text), Loader=_RulesLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "<document>"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise GateRulesError(where, f"invalid YAML: {problem}", source) from None
    return parse_rules(data, source=source)


# ----------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class RuleResult:
    rule: str  # description
    task: str | None
    length: int | None
    value: float | None  # measured; None when the report lacks it
    threshold: float
    passed: bool
    detail: str
    index: int = 0
    kind: str = ""
    n: int | None = None  # cases behind the measured value (None: not sampled)
    detectable: float | None = None  # smallest regression detected at n (power.py)
    powered: bool = True
    needed: int | None = None  # smallest n that meets the rule's power requirement
    power_note: str = ""  # why it is underpowered

    @property
    def detects(self) -> str:
        """The detectable regression as table text (``exact`` for the memory ratio)."""
        if self.kind == "max_memory_ratio":
            return "exact"
        if self.n is None and self.detectable is None and not self.power_note:
            return "-"
        text = describe(self.kind, self.detectable)
        return text if self.powered else f"{text} (underpowered)"


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
        return {"passed": self.passed, "results": [asdict(r) for r in self.results]}


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _side(row: Mapping[str, Any], side: str) -> Mapping[str, Any]:
    s = row.get(side)
    return s if isinstance(s, Mapping) else {}


def _nll_increase(row: Mapping[str, Any]) -> tuple[float | None, str]:
    """Relative NLL increase from the raw NLLs when present, else the stored field."""
    bn, an = _num(_side(row, "baseline").get("nll")), _num(_side(row, "artifact").get("nll"))
    if bn is not None and an is not None:
        if bn <= 0:
            return None, f"baseline NLL is {bn:g}; a relative increase is undefined"
        return an / bn - 1.0, f"NLL {bn:.4f} -> {an:.4f}"
    inc = _num(row.get("nll_increase"))
    if inc is not None:
        return inc, "from nll_increase"
    return None, "no baseline/artifact NLL or nll_increase"


def _has_metric(kind: str, row: Mapping[str, Any]) -> bool:
    if kind in ("min_accuracy", "max_drop"):
        return is_accuracy_row(row)
    if kind == "max_nll_increase":
        return "nll" in _side(row, "baseline") or "nll_increase" in row
    if kind == "max_kl":
        return "kl" in row
    if kind == "min_agreement":
        return "agreement" in row
    return "memory_ratio" in row


def _check_row(rule: Rule, row: Mapping[str, Any]) -> tuple[float | None, bool, str]:
    """(measured value, passed, detail) of one rule on one report row."""
    thr, label = rule.threshold, row_label(row)
    kind = rule.kind
    if kind in ("min_accuracy", "max_drop"):
        art = accuracy_of(row, "artifact")
        if art is None:
            return None, False, f"{label} has no artifact accuracy"
        if kind == "min_accuracy":
            ok = not accuracy_fails(rule, None, art[0], art[2])
            return art[0], ok, f"artifact accuracy {art[0]:.4g} {'>=' if ok else '<'} {thr:g}"
        base = accuracy_of(row, "baseline")
        if base is None:
            return None, False, f"{label} has no baseline accuracy"
        drop = base[0] - art[0]
        if rule.by == "point":
            ok = not accuracy_fails(rule, base[0], art[0], art[2])
            return (
                drop,
                ok,
                (
                    f"baseline {base[0]:.4g} - artifact {art[0]:.4g} = {drop:.4g} "
                    f"{'<=' if ok else '>'} {thr:g}"
                ),
            )
        upper, bound = art[2], base[0] - thr
        if not math.isfinite(upper):
            return drop, False, f"{label} has no artifact interval (ci95, or correct and n)"
        ok = not accuracy_fails(rule, base[0], art[0], upper)
        verdict = "not established" if ok else "established"
        return (
            drop,
            ok,
            (
                f"drop {drop:.4g}: artifact 95% upper {upper:.4g} "
                f"{'>=' if ok else '<'} baseline - {thr:g} = {bound:.4g} ({verdict})"
            ),
        )
    if kind == "max_nll_increase":
        inc, how = _nll_increase(row)
        if inc is None:
            return None, False, f"{label}: {how}"
        ok = inc <= thr + _EPS
        return inc, ok, f"{how}: {100 * inc:+.2f}% {'<=' if ok else '>'} {100 * thr:g}%"
    key, cmp_max = {
        "max_kl": ("kl", True),
        "min_agreement": ("agreement", False),
        "max_memory_ratio": ("memory_ratio", True),
    }[kind]
    value = _num(row.get(key))
    if value is None:
        return None, False, f"{label} has no numeric {key}"
    ok = value <= thr + _EPS if cmp_max else value >= thr - _EPS
    op = ("<=" if ok else ">") if cmp_max else (">=" if ok else "<")
    return value, ok, f"{key} {value:.4g} {op} {thr:g}"


def _as_int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _int_length(row: Mapping[str, Any]) -> int | None:
    return _as_int(row.get("length"))


def _evaluate_rule(
    rule: Rule, rows: list[Mapping[str, Any]], report: Mapping[str, Any]
) -> list[RuleResult]:
    def result(
        task: str | None,
        length: int | None,
        value: float | None,
        ok: bool,
        detail: str,
        power: Power = EXACT,
    ) -> RuleResult:
        return RuleResult(
            rule.description, task, length, value, rule.threshold, ok, detail, rule.index,
            rule.kind, power.n, power.detectable, power.powered, power.needed, power.reason,
        )

    if rule.kind == "max_memory_ratio" and rule.task is None and rule.lengths is None:
        mem = report.get("kv_memory")
        mem = mem if isinstance(mem, Mapping) else {}
        ratio, how = _memory_ratio(mem)
        if ratio is None:
            return [result(None, None, None, False,
                           how if how != "kv_memory.ratio" else "report has no numeric kv_memory.ratio")]
        ok = ratio <= rule.threshold + _EPS
        ctx = _as_int(mem.get("context"))
        at = f" at context {ctx}" if ctx is not None else ""
        return [
            result(
                None,
                ctx,
                ratio,
                ok,
                f"{how}{at} {ratio:.4g} {'<=' if ok else '>'} {rule.threshold:g}",
            )
        ]

    if rule.task is not None:
        candidates = [r for r in rows if r.get("task") == rule.task]
        if not candidates:
            present = sorted({str(r.get("task")) for r in rows}) or ["none"]
            return [
                result(
                    rule.task,
                    None,
                    None,
                    False,
                    f"no {rule.task!r} rows in the report (tasks present: {', '.join(present)})",
                )
            ]
    else:
        candidates = [r for r in rows if _has_metric(rule.kind, r)]
        if not candidates:
            return [
                result(None, None, None, False, f"no report row carries the metric of {rule.kind}")
            ]

    what = f"{rule.task!r} row" if rule.task is not None else f"row with {rule.kind} data"
    selected: list[Mapping[str, Any]] = []
    missing: list[RuleResult] = []
    if rule.lengths is None:
        selected = candidates
    else:
        for length in rule.lengths:
            at_length = [r for r in candidates if _int_length(r) == length]
            if not at_length:
                have = sorted({n for r in candidates if (n := _int_length(r)) is not None})
                missing.append(
                    result(
                        rule.task,
                        length,
                        None,
                        False,
                        f"no {what} at length {length} in the report "
                        f"(lengths present: {', '.join(map(str, have)) or 'none'})",
                    )
                )
            selected += at_length

    out: list[RuleResult] = []
    for row in selected:
        value, ok, detail = _check_row(rule, row)
        task = row.get("task")
        out.append(
            result(
                task if isinstance(task, str) else None,
                _int_length(row),
                value,
                ok,
                detail,
                row_power(rule, row) if value is not None else NOT_ASSESSED,  # failed anyway
            )
        )
    out.sort(key=lambda r: (r.task or "", r.length or 0))
    return out + missing


def _memory_ratio(mem: Mapping[str, Any]) -> tuple[float | None, str]:
    """The report's KV memory ratio: allocated artifact bytes over the baseline's when the
    report has both, else its stored ratio. A stored ratio that disagrees with the bytes
    (an edited or corrupt report) gives no ratio, so the rule fails."""
    art, base = _num(mem.get("artifact_bytes")), _num(mem.get("baseline_bytes"))
    stored = _num(mem.get("ratio"))
    if art is not None and base is not None and base > 0:
        if stored is not None and abs(stored - art / base) > 1e-5:
            return None, (f"kv_memory.ratio {stored:g} disagrees with its bytes {art:.0f} / "
                          f"{base:.0f} = {art / base:.6g}: the report was edited or is corrupt; "
                          f"regenerate it with kvcompile eval")
        measured = mem.get("measured")
        what = f"{measured} " if isinstance(measured, str) else ""
        return art / base, f"{what}KV bytes {art:.0f} / {base:.0f}"
    return stored, "kv_memory.ratio"


def row_power(rule: Rule, row: Mapping[str, Any]) -> Power:
    """What ``rule`` detects on ``row`` at its n (definitions: :mod:`kvcompile.gate.power`)."""
    if rule.kind in ACCURACY_KINDS:
        n = _as_int(row.get("n"))
        if n is None:
            return Power(None, None, False, None, "the row has no case count n")
        base = accuracy_of(row, "baseline")
        return accuracy_power(rule, n, None if base is None else base[0])
    if rule.kind in CONTINUOUS_KINDS:
        return continuous_power(rule, row)
    return EXACT


def evaluate(rules: GateRules, report: Mapping[str, Any]) -> GateOutcome:
    """Check every rule against the report; one :class:`RuleResult` per rule and row.

    Raises :class:`~kvcompile.eval.report.ReportError` if ``report`` is not a
    ``kvcompile-report/1`` document at all (the gate cannot judge it), and
    :class:`UnderpoweredRuleError` if a rule cannot fail (or detect its ``detect``) at the
    report's n and does not say ``allow_underpowered: true``.
    """
    check_report(report)
    rows = [r for r in report["tasks"] if isinstance(r, Mapping)]
    results: list[RuleResult] = []
    for rule in rules.rules:
        results += _evaluate_rule(rule, rows, report)
    check_power(rules, results)
    return GateOutcome(results)


def check_power(rules: GateRules, results: list[RuleResult]) -> None:
    """Raise :class:`UnderpoweredRuleError` for the first underpowered pass not allowed to be.

    Only passing checks count: a pass is evidence only if the check could have failed; a
    check that failed has shown that it can, and the gate reports the failure (exit 1).
    """
    allowed = {rule.index for rule in rules.rules if rule.allow_underpowered}
    weak = [r for r in results if r.passed and not r.powered and r.index not in allowed]
    if not weak:
        return
    first = weak[0]
    where = f"{first.task or '?'}@{first.length if first.length is not None else '?'}"
    power = Power(first.n, first.detectable, first.powered, first.needed, first.power_note)
    more = f" ({len(weak) - 1} more underpowered checks)" if len(weak) > 1 else ""
    raise UnderpoweredRuleError(
        f"rules[{first.index}]",
        f"{first.rule!r} {first.power_note} at n={first.n} on {where} (power {POWER:g}); "
        f"{power.remedy}, or set allow_underpowered: true{more}",
        rules.source,
    )


def run_gate(
    report_path: str | os.PathLike[str], rules_path: str | os.PathLike[str]
) -> GateOutcome:
    """Load both files and evaluate: what ``kvcompile gate REPORT --rules RULES`` does."""
    from kvcompile.eval.report import load_report

    rules = load_rules(rules_path)
    return evaluate(rules, load_report(report_path))


# ----------------------------------------------------------------------------- rendering


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def render_table(outcome: GateOutcome, *, color: bool = False, width: int = 140) -> str:
    """The pass/fail table as text, ASCII-boxed so it reads the same in a CI log.

    ``color=True`` adds ANSI colours (for an interactive terminal); the default is plain
    text. Cells are ``Text`` objects, so brackets in rule names are never read as markup.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.ASCII2, header_style="bold" if color else "")
    table.add_column("#", justify="right")
    table.add_column("status")
    table.add_column("rule")
    table.add_column("task")
    table.add_column("length", justify="right")
    table.add_column("measured", justify="right")
    table.add_column("threshold", justify="right")
    table.add_column("n", justify="right")
    table.add_column(f"detects (power {POWER:g})")
    table.add_column("detail", overflow="fold")
    for r in outcome.results:
        style = ("green" if r.passed else "bold red") if color else ""
        table.add_row(
            Text(str(r.index)),
            Text("PASS" if r.passed else "FAIL", style=style),
            Text(r.rule),
            Text(r.task or "-"),
            Text("-" if r.length is None else str(r.length)),
            Text(_fmt(r.value)),
            Text(f"{r.threshold:g}"),
            Text("-" if r.n is None else str(r.n)),
            Text(r.detects),
            Text(r.detail),
        )
    buf = io.StringIO()
    console = Console(
        file=buf,
        width=width,
        force_terminal=color,
        no_color=not color,
        color_system="standard" if color else None,
        highlight=False,
        emoji=False,
        markup=False,
        soft_wrap=False,
    )
    console.print(table)
    if not outcome.results:
        summary = "gate FAILED: no checks were run"
    elif outcome.passed:
        summary = f"gate PASSED: {len(outcome.results)} checks"
    else:
        summary = f"gate FAILED: {len(outcome.failures)} of {len(outcome.results)} checks failed"
    return buf.getvalue() + summary + "\n"


# ----------------------------------------------------------------------------- planning

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
    pilot: Mapping[str, Any] | None = None,
    baselines: tuple[float, ...] = PLAN_BASELINES,
) -> list[SampleNeed]:
    """The n each rule needs to meet its power requirement (:mod:`kvcompile.gate.power`).

    With a ``pilot`` report (any n), every rule is sized on the rows it checks there: the
    pilot's baseline accuracies and per-case spreads. Without one, accuracy rules are sized
    for each assumed baseline accuracy in ``baselines``; NLL, KL and agreement rules need a
    pilot (their spread is unknown); the memory ratio needs no samples.
    """
    needs: list[SampleNeed] = []
    if pilot is not None:
        check_report(pilot)
        rows = [r for r in pilot["tasks"] if isinstance(r, Mapping)]
        for rule in rules.rules:
            for r in _evaluate_rule(rule, rows, pilot):
                if r.kind == "max_memory_ratio":
                    needs.append(SampleNeed(r.index, r.rule, r.task, r.length, "-", 0, "exact"))
                elif r.n is None and r.detectable is None and not r.power_note:
                    needs.append(SampleNeed(r.index, r.rule, r.task, r.length, "-", None, r.detail))
                else:
                    note = "" if r.needed is not None else f"no n up to {MAX_SAMPLES}"
                    needs.append(SampleNeed(r.index, r.rule, r.task, r.length,
                                            f"pilot n={r.n}", r.needed, note))
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

    if rule.kind == "max_memory_ratio":
        return [need("-", 0, "exact")]
    if rule.kind in CONTINUOUS_KINDS:
        return [need("-", None, "needs a pilot report (per-case spread)")]
    if rule.kind == "min_accuracy":
        n = accuracy_needed(rule, 1.0)
        return [need("-", n, f"no n up to {MAX_SAMPLES}" if n is None else _no_detect(rule))]
    out = []
    for base in baselines:
        n = accuracy_needed(rule, base)
        note = "" if n is not None else "the baseline leaves no room for the drop"
        out.append(need(f"baseline {base:.2f}", n, note or _no_detect(rule)))
    return out


def _no_detect(rule: Rule) -> str:
    return "" if rule.detect is not None else "only to be able to fail; add detect: to size it"


def render_plan(needs: list[SampleNeed], pilot: bool, width: int = 140) -> str:
    """The planning table and, per task, the largest n any rule needs."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.ASCII2)
    for name, justify in (("#", "right"), ("rule", "left"), ("task", "left"),
                          ("length", "right"), ("assumes", "left"), ("needs n", "right"),
                          ("note", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for need in needs:
        table.add_row(*(Text(str(cell)) for cell in (
            need.index, need.rule, need.task or "-", "-" if need.length is None else need.length,
            need.assumes, "-" if need.needed is None else need.needed, need.note)))
    buf = io.StringIO()
    Console(file=buf, width=width, no_color=True, highlight=False, emoji=False, markup=False,
            soft_wrap=False).print(table)
    source = "the pilot report's baselines and spreads" if pilot else "assumed baselines"
    largest: dict[str, SampleNeed] = {}
    for need in needs:
        if need.needed and need.task and (
            need.task not in largest or need.needed > (largest[need.task].needed or 0)
        ):
            largest[need.task] = need
    summary = ", ".join(
        f"{task} {need.needed}" + (f" ({need.assumes})" if need.assumes != "-" else "")
        for task, need in largest.items()
    )
    return (
        f"cases per task and length each rule needs (power {POWER:g}; {source})\n"
        + buf.getvalue()
        + (f"largest per task: {summary}\n" if summary else "")
    )


__all__ = [
    "GATES_FORMAT",
    "KINDS",
    "GateOutcome",
    "GateRules",
    "GateRulesError",
    "ReportError",
    "Rule",
    "RuleResult",
    "SampleNeed",
    "UnderpoweredRuleError",
    "check_power",
    "plan_samples",
    "render_plan",
    "row_power",
    "evaluate",
    "load_rules",
    "loads_rules",
    "parse_rules",
    "render_table",
    "run_gate",
]
