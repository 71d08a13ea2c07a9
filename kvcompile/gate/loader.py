"""The rules file (``kvcompile-gates/1``): its schema, read from YAML into rule objects.

::

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

Each rule has exactly one kind key (the threshold; :mod:`kvcompile.gate.rules` defines the
kinds) plus optional ``task``, ``length`` (int or list; omitted = every length the report
has for the task), ``by`` (``max_drop`` only), ``name`` (a label for the table),
``detect`` (the regression it must catch; without it, the default of
:func:`kvcompile.gate.power.default_detect`) and ``allow_underpowered``. Errors are one
line naming the field by path (``rules[2].max_drop``); rule indices are 0-based.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml

from kvcompile.errors import KVCompileError
from kvcompile.gate.rules import RULE_KINDS, MaxDrop, Rule

GATES_FORMAT = "kvcompile-gates/1"
_RULE_KEYS = frozenset(RULE_KINDS) | {"task", "length", "by", "name", "detect", "allow_underpowered"}


class GateRulesError(KVCompileError, ValueError):
    """An invalid rules file; the message is one line naming the field by path."""

    def __init__(self, field_path: str, message: str, source: str | None = None) -> None:
        self.field_path = field_path
        self.message = message
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(f"{prefix}{field_path}: {message}")


class UnderpoweredRuleError(GateRulesError):
    """A rule that cannot detect what it must at the report's sample size."""


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
    raw: Mapping[str, Any], cls: type[Rule], threshold: float, at: str, err: _Err
) -> float | None:
    """``detect`` lies on the failing side of the threshold, in the threshold's units."""
    if "detect" not in raw:
        return None
    where = f"{at}.detect"
    kind = cls.kind
    if not cls.sampled:
        err(where, "the memory ratio is measured, not sampled: remove detect")
    value = _parse_threshold(raw["detect"], *cls.bounds, where, err)
    if cls.lower_is_worse and not value < threshold:
        err(where, f"must be below {kind} {threshold:g} (an {kind[4:]} the rule must catch)")
    if not cls.lower_is_worse and not value > threshold:
        err(where, f"must be above {kind} {threshold:g} (a regression the rule must catch)")
    return value


def _parse_rule(raw: Any, i: int, err: _Err) -> Rule:
    at = f"rules[{i}]"
    if not isinstance(raw, Mapping):
        err(at, f"expected a mapping, got {_describe(raw)}")
    for key in raw:
        if key not in _RULE_KEYS:
            err(f"{at}.{key}", f"unknown key (allowed: {', '.join(sorted(_RULE_KEYS))})")
    kinds = [k for k in RULE_KINDS if k in raw]
    if len(kinds) != 1:
        got = ", ".join(kinds) if kinds else "none"
        err(at, f"expected exactly one of {', '.join(RULE_KINDS)}; got {got}")
    cls = RULE_KINDS[kinds[0]]
    threshold = _parse_threshold(raw[cls.kind], *cls.bounds, f"{at}.{cls.kind}", err)
    task = raw.get("task")
    if "task" in raw and (not isinstance(task, str) or not task.strip()):
        err(f"{at}.task", f"expected a task name, got {_describe(task)}")
    lengths = _parse_lengths(raw["length"], f"{at}.length", err) if "length" in raw else None
    extra: dict[str, Any] = {}
    if "by" in raw:
        if cls is not MaxDrop:
            err(f"{at}.by", f"only valid with max_drop, not {cls.kind}")
        if raw["by"] not in MaxDrop.BY:
            err(f"{at}.by", f"expected 'point' or 'interval', got {_describe(raw['by'])}")
        extra["by"] = raw["by"]
    name = raw.get("name")
    if "name" in raw and not isinstance(name, str):
        err(f"{at}.name", f"expected a string, got {_describe(name)}")
    detect = _parse_detect(raw, cls, threshold, at, err)
    allow = raw.get("allow_underpowered", False)
    if not isinstance(allow, bool):
        err(f"{at}.allow_underpowered", f"expected true or false, got {_describe(allow)}")
    return cls(i, threshold, task, lengths, name, detect, allow, **extra)


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
    return GateRules(tuple(_parse_rule(raw, i, err) for i, raw in enumerate(raw_rules)), source)


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


__all__ = [
    "GATES_FORMAT",
    "GateRules",
    "GateRulesError",
    "UnderpoweredRuleError",
    "load_rules",
    "loads_rules",
    "parse_rules",
]
