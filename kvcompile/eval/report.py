"""The evaluation report (format ``kvcompile-report/1``): a typed record, its writer and its reader.

``kvcompile eval`` builds a :class:`Report`; :func:`write_report` writes it as JSON (the
record a CI gate reads) with a Markdown summary and a PNG plot beside it
(:mod:`kvcompile.eval.render`); :func:`load_report` reads the JSON back and checks every
field, so a bad or tampered file is one line naming the field. Nothing else reads the
file's keys: the gate, the renderers, the CLI and the bench scripts use the record.

File form: one JSON object whose keys are the records' field names, except
``Report.rows`` (key ``tasks``) and ``Report.memory`` (key ``kv_memory``). A row is a
:class:`ContinuationRow` when its task is ``continuation`` (or, in a hand-written report,
when it has NLLs and no accuracies), else an :class:`AccuracyRow` (``passkey``,
``multikey``, a team's ``answers``). Every field but ``format``, ``tasks`` and a row's
``task`` and ``length`` may be absent or null (the writer writes a NaN as null), so
hand-written and older reports still read; unknown keys are ignored.

Output path convention (``-o REPORT``): ``REPORT`` may name any of the three files or
their common stem. A trailing ``.json``, ``.md`` or ``.png`` (any case) is stripped to
get the stem; anything else *is* the stem (``run.v2`` -> ``run.v2.json``). An existing
directory gets ``report.json`` / ``report.md`` / ``report.png`` inside it. So
``-o report.json``, ``-o report`` and ``-o report.md`` all write
``report.json``, ``report.md`` and ``report.png``.
"""

from __future__ import annotations

import io
import json
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, NamedTuple

from kvcompile.errors import KVCompileError
from kvcompile.memory import BASELINE_DTYPES, memory_ratio
from kvcompile.plan_io import Reader
from kvcompile.stats import nll_increase, wilson_interval
from kvcompile.yamlio import atomic_write_bytes

REPORT_FORMAT = "kvcompile-report/1"
CONTINUATION_TASK = "continuation"
_SUFFIXES = (".json", ".md", ".png")
_RATIO_TOLERANCE = 1e-5  # a stored ratio is rounded to 6 digits

Interval = tuple[float, float]  # a 95% interval [lo, hi]


class ReportError(KVCompileError, ValueError):
    """A report file that cannot be read or is not a ``kvcompile-report/1`` document."""


def _meta(key: str | None = None, lo: float | None = None, hi: float | None = None,
          required: bool = False) -> dict[str, Any]:
    """Field metadata for the reader and writer: the file's key when it is not the field's
    name, the range a number must lie in, whether the file must have it."""
    return {"key": key, "lo": lo, "hi": hi, "required": required}


_UNIT = _meta(lo=0.0, hi=1.0)
_COUNT = _meta(lo=0)
_NONNEGATIVE = _meta(lo=0.0)


# ----------------------------------------------------------------------------- the record


class Estimate(NamedTuple):
    """An accuracy with its 95% interval (``lo``/``hi`` NaN when neither stored nor derivable)."""

    value: float
    lo: float
    hi: float


@dataclass(frozen=True)
class AccuracySide:
    """One system's answers on an accuracy row."""

    correct: int | None = field(default=None, metadata=_COUNT)
    accuracy: float | None = field(default=None, metadata=_UNIT)
    ci95: Interval | None = field(default=None, metadata=_UNIT)  # Wilson
    wall_time_s: float | None = field(default=None, metadata=_NONNEGATIVE)

    def estimate(self, n: int | None) -> Estimate | None:
        """The stored accuracy and interval; ``correct / n`` and the Wilson interval where they
        are missing (hand-written reports), None when there is no accuracy at all."""
        acc = self.accuracy
        if acc is None and self.correct is not None and n:
            acc = self.correct / n
        if acc is None:
            return None
        if self.ci95 is not None:
            return Estimate(acc, *self.ci95)
        if self.correct is not None and n is not None:
            return Estimate(acc, *wilson_interval(self.correct, n))
        return Estimate(acc, math.nan, math.nan)


@dataclass(frozen=True)
class AccuracyRow:
    """Right/wrong answers of the baseline and the artifact on the same ``n`` cases."""

    task: str = field(metadata=_meta(required=True))
    length: int = field(metadata=_meta(lo=1, required=True))
    n: int | None = field(default=None, metadata=_COUNT)
    baseline: AccuracySide = AccuracySide()
    artifact: AccuracySide = AccuracySide()
    memory_ratio: float | None = field(default=None, metadata=_NONNEGATIVE)

    def __post_init__(self) -> None:
        for name, side in (("baseline", self.baseline), ("artifact", self.artifact)):
            if side.correct is not None and self.n is not None and side.correct > self.n:
                raise ValueError(f"{name}.correct: {side.correct} is more than n = {self.n}")

    @property
    def label(self) -> str:
        return f"{self.task}@{self.length}"


@dataclass(frozen=True)
class NllSide:
    """One system's mean NLL per continuation token."""

    nll: float | None = None
    wall_time_s: float | None = field(default=None, metadata=_NONNEGATIVE)


@dataclass(frozen=True)
class ContinuationCases:
    """Per-case values (one per continuation) behind a row's means: the gate's spreads."""

    baseline_nll: tuple[float, ...] | None = None
    artifact_nll: tuple[float, ...] | None = None
    kl: tuple[float, ...] | None = None
    agreement: tuple[float, ...] | None = field(default=None, metadata=_UNIT)


@dataclass(frozen=True)
class ContinuationRow:
    """NLL, KL(baseline || artifact) and greedy agreement on the same ``n`` continuations."""

    task: str = field(metadata=_meta(required=True))
    length: int = field(metadata=_meta(lo=1, required=True))
    n: int | None = field(default=None, metadata=_COUNT)
    tokens: int | None = field(default=None, metadata=_COUNT)  # scored tokens per case (mean)
    baseline: NllSide = NllSide()
    artifact: NllSide = NllSide()
    nll_increase: float | None = None  # artifact NLL / baseline NLL - 1
    nll_increase_ci95: Interval | None = None
    kl: float | None = field(default=None, metadata=_NONNEGATIVE)
    kl_ci95: Interval | None = None
    agreement: float | None = field(default=None, metadata=_UNIT)
    agreement_n: int | None = field(default=None, metadata=_COUNT)  # tokens compared
    agreement_ci95: Interval | None = field(default=None, metadata=_UNIT)
    memory_ratio: float | None = field(default=None, metadata=_NONNEGATIVE)
    cases: ContinuationCases = ContinuationCases()

    def __post_init__(self) -> None:
        for f in fields(ContinuationCases):
            values = getattr(self.cases, f.name)
            if values is not None and self.n is not None and len(values) != self.n:
                raise ValueError(f"cases.{f.name}: {len(values)} values for n = {self.n} cases")

    @property
    def label(self) -> str:
        return f"{self.task}@{self.length}"

    def measured_nll_increase(self) -> float | None:
        """The relative NLL increase: from the two NLLs when the row has both (the stored
        field is rounded), else the stored field; None without either, or when the baseline
        NLL is not positive (a relative increase is undefined)."""
        base, art = self.baseline.nll, self.artifact.nll
        if base is not None and art is not None:
            return nll_increase(art, base) if base > 0 else None
        return self.nll_increase


Row = AccuracyRow | ContinuationRow


@dataclass(frozen=True)
class KVMemory:
    """The artifact's KV state against the source model's own cache, at ``context`` tokens.

    Two kinds of bytes, kept apart: the ratio's (``artifact_bytes / baseline_bytes``, every
    full-precision value counted at ``baseline_dtype``, ``kvcompile.memory``), and the bytes the
    runtime under evaluation really allocated for the artifact (``allocated_bytes``, in
    ``allocated_dtype``, its compute dtype), which are no part of any ratio.
    """

    ratio: float | None = field(default=None, metadata=_NONNEGATIVE)  # artifact / baseline bytes
    context: int | None = field(default=None, metadata=_COUNT)
    measured: str | None = None  # "allocated": the runtime's allocation, counted at baseline_dtype
    artifact_bytes: int | None = field(default=None, metadata=_COUNT)  # at baseline_dtype
    baseline_bytes: int | None = field(default=None, metadata=_COUNT)  # at baseline_dtype
    # dtype the ratio's bytes count values at; None: a report from before it was stated
    baseline_dtype: str | None = None
    allocated_bytes: int | None = field(default=None, metadata=_COUNT)  # at allocated_dtype
    allocated_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.baseline_dtype is not None and self.baseline_dtype not in BASELINE_DTYPES:
            raise ValueError(f"baseline_dtype: expected one of {sorted(BASELINE_DTYPES)}, got "
                             f"{self.baseline_dtype!r}")

    @property
    def ratio_of_bytes(self) -> float | None:
        """``artifact_bytes / baseline_bytes`` by the one definition
        (:func:`kvcompile.memory.memory_ratio`); None without both."""
        if self.artifact_bytes is None or self.baseline_bytes is None or self.baseline_bytes <= 0:
            return None
        return memory_ratio(self.artifact_bytes, self.baseline_bytes)

    def disagrees(self) -> bool:
        """Whether the stored ratio differs from the bytes' ratio by more than its rounding."""
        of_bytes = self.ratio_of_bytes
        return self.ratio is not None and of_bytes is not None and abs(self.ratio - of_bytes) > _RATIO_TOLERANCE

    def checked_ratio(self) -> float | None:
        """The ratio a gate checks: of the bytes when the report has them, else the stored
        ratio; None when the two disagree (:meth:`disagrees`: an edited or corrupt report)."""
        if self.disagrees():
            return None
        of_bytes = self.ratio_of_bytes
        return self.ratio if of_bytes is None else of_bytes


@dataclass(frozen=True)
class ArtifactInfo:
    """What was evaluated (set by ``kvcompile eval``)."""

    path: str | None = None
    model_id: str | None = None
    fingerprint: str | None = None
    policy: str | None = None
    backend: str | None = None


@dataclass(frozen=True)
class EvalSettings:
    """How the cases were made: enough to rerun the evaluation."""

    tasks: tuple[str, ...] | None = None
    lengths: tuple[int, ...] | None = None
    samples: Mapping[str, int] | None = None  # cases per task and length (generated tasks)
    genre: str | None = None  # text of the generated tasks
    cases: int | None = field(default=None, metadata=_COUNT)  # a team's cases file, instead
    answer_tokens: int | None = field(default=None, metadata=_COUNT)
    agreement_tokens: int | None = field(default=None, metadata=_COUNT)
    systems_in_run: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Report:
    """One system's evaluation against the uncompressed baseline."""

    kvcompile_version: str | None = None
    created_with: Mapping[str, str] | None = None  # versions: python, torch, transformers
    seed: int | None = None
    settings: EvalSettings | None = None
    memory: KVMemory | None = field(default=None, metadata=_meta(key="kv_memory"))
    wall_time_s: float | None = field(default=None, metadata=_NONNEGATIVE)
    rows: tuple[Row, ...] = field(default=(), metadata=_meta(key="tasks", required=True))
    artifact: ArtifactInfo | None = None

    @property
    def accuracy_rows(self) -> list[AccuracyRow]:
        return [row for row in self.rows if isinstance(row, AccuracyRow)]

    @property
    def continuation_rows(self) -> list[ContinuationRow]:
        return [row for row in self.rows if isinstance(row, ContinuationRow)]

    @property
    def tasks(self) -> list[str]:
        """The rows' tasks, in order of first appearance."""
        return list(dict.fromkeys(row.task for row in self.rows))

    def row(self, task: str, length: int) -> Row | None:
        return next((r for r in self.rows if (r.task, r.length) == (task, length)), None)


# ----------------------------------------------------------------------------- writer


def _key(f: Any) -> str:
    return f.metadata.get("key") or f.name


def _jsonable(obj: Any) -> Any:
    """Plain JSON types only: records become objects (absent fields left out: None, or an
    empty default record), tuples lists, NaN/inf null (strict JSON)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {_key(f): _jsonable(value) for f in fields(obj)
                if (value := getattr(obj, f.name)) is not None
                and not (is_dataclass(value) and value == f.default)}
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        return _jsonable(item())
    raise TypeError(f"report value of type {type(obj).__name__} is not JSON-serialisable")


def report_to_dict(report: Report) -> dict[str, Any]:
    """The file form of ``report`` (the one writer; ``format`` first)."""
    return {"format": REPORT_FORMAT, **_jsonable(report)}


def report_to_json(report: Report) -> str:
    return json.dumps(report_to_dict(report), indent=2, allow_nan=False) + "\n"


@dataclass(frozen=True)
class ReportPaths:
    json: Path
    markdown: Path
    png: Path


def report_paths(out: str | os.PathLike[str]) -> ReportPaths:
    """Derive the three output paths from ``-o`` (see the module docstring)."""
    path = Path(out)
    if path.is_dir():
        stem = path / "report"
    elif path.suffix.lower() in _SUFFIXES:
        stem = path.with_suffix("")
    else:
        stem = path
    return ReportPaths(
        json=stem.with_name(stem.name + ".json"),
        markdown=stem.with_name(stem.name + ".md"),
        png=stem.with_name(stem.name + ".png"),
    )


def write_report(report: Report, out_path: str | os.PathLike[str]) -> ReportPaths:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png``; return their paths.

    Everything is rendered in memory first, so a rendering error writes nothing; each
    file is then replaced atomically. Parent directories are created.
    """
    from kvcompile.eval.render import plot_accuracy, render_markdown

    paths = report_paths(out_path)
    json_bytes = report_to_json(report).encode("utf-8")
    md_bytes = render_markdown(report).encode("utf-8")
    png = io.BytesIO()
    plot_accuracy(report, png)
    paths.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(paths.json, json_bytes)
    atomic_write_bytes(paths.markdown, md_bytes)
    atomic_write_bytes(paths.png, png.getvalue())
    return paths


# ----------------------------------------------------------------------------- reader


class _Reader(Reader):
    """The plan's checking reader, raising :class:`ReportError`."""

    def fail(self, path: str, message: str) -> ReportError:  # type: ignore[override]
        where = f"{self.source}: " if self.source else ""
        return ReportError(f"{where}{path or '<document>'}: {message}")


def load_report(path: str | os.PathLike[str]) -> Report:
    """Read a report written by :func:`write_report` (``report.json`` or its stem)."""
    p = Path(path)
    if not p.is_file():
        p = report_paths(p).json
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"{p}: cannot read report: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return report_from_dict(data, source=str(p))


def report_from_dict(data: Any, source: str = "") -> Report:
    """The one reader: a parsed ``kvcompile-report/1`` document as a :class:`Report`.

    Raises :class:`ReportError` naming the first bad field (``tasks[2].artifact.correct``).
    """
    r = _Reader(source)
    data = r.mapping(data, "")
    if data.get("format") != REPORT_FORMAT:
        raise r.fail("format", f"expected {REPORT_FORMAT!r}, got {data.get('format')!r}")
    settings = data.get("settings")
    if isinstance(settings, dict) and isinstance(settings.get("samples"), int):
        # early reports: one count for every task
        tasks = settings.get("tasks") if isinstance(settings.get("tasks"), list) else []
        data = {**data, "settings": {**settings, "samples": dict.fromkeys(tasks, settings["samples"])}}
    return _read_record(r, Report, data, "")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _read_record(r: _Reader, cls: type, data: Any, path: str) -> Any:
    data = r.mapping(data, path or "<document>")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):
        key, where = _key(f), _join(path, _key(f))
        if key not in data:
            if f.metadata.get("required") or (f.default is MISSING and f.default_factory is MISSING):
                raise r.fail(where, "missing")
            continue
        values[f.name] = _read_value(r, hints[f.name], data[key], where, f.metadata)
    try:
        return cls(**values)
    except ValueError as exc:  # the record's own invariants name the field below ``path``
        message = str(exc)
        name, sep, rest = message.partition(": ")
        if sep and name.split(".")[0] in values:
            raise r.fail(_join(path, name), rest) from None
        raise r.fail(path or "<document>", message) from None


def _row_class(data: Any) -> type:
    """A continuation row by its task, or by NLLs without accuracies (hand-written rows)."""
    if not isinstance(data, dict):
        return AccuracyRow
    if data.get("task") == CONTINUATION_TASK:
        return ContinuationRow
    sides = [s for s in (data.get("baseline"), data.get("artifact")) if isinstance(s, dict)]
    answers = any(k in s for s in sides for k in ("correct", "accuracy"))
    return ContinuationRow if not answers and any("nll" in s for s in sides) else AccuracyRow


def _read_value(r: _Reader, hint: Any, value: Any, where: str, meta: Mapping[str, Any]) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if type(None) in args:  # optional: null reads as absent
            if value is None:
                return None
            rest = [a for a in args if a is not type(None)]
            hint = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007
            return _read_value(r, hint, value, where, meta)
        if all(is_dataclass(a) for a in args):  # Row
            return _read_record(r, _row_class(value), value, where)
    if is_dataclass(hint):
        return _read_record(r, hint, value, where)
    if hint is int or hint is float:
        return _number(r, value, where, meta, integer=hint is int)
    if hint is str:
        if not isinstance(value, str):
            raise r.fail(where, f"expected a string, got {value!r}")
        return value
    origin = typing.get_origin(hint)
    if origin is tuple:
        items = _list(r, value, where)
        if args == (float, float):
            if len(items) != 2:
                raise r.fail(where, f"expected [lo, hi], got {len(items)} values")
            lo, hi = (_number(r, v, f"{where}[{i}]", meta, integer=False) for i, v in enumerate(items))
            if lo > hi:
                raise r.fail(where, f"expected lo <= hi, got [{lo!r}, {hi!r}]")
            return (lo, hi)
        return tuple(_read_value(r, args[0], v, f"{where}[{i}]", meta) for i, v in enumerate(items))
    if origin is Mapping:
        mapping = r.mapping(value, where)
        return {str(k): _read_value(r, args[1], v, _join(where, str(k)), meta)
                for k, v in mapping.items()}
    raise TypeError(f"no reader for {hint!r}")  # a field type this module does not handle


def _list(r: _Reader, value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise r.fail(where, f"expected a list, got {type(value).__name__}")
    return value


def _number(r: _Reader, value: Any, where: str, meta: Mapping[str, Any], integer: bool) -> Any:
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise r.fail(where, f"expected an integer, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise r.fail(where, f"expected a finite number, got {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"in [{lo:g}, {hi:g}]" if hi is not None else f">= {lo:g}"
        raise r.fail(where, f"expected a number {bounds}, got {value!r}")
    return value if integer else float(value)


__all__ = [
    "CONTINUATION_TASK",
    "REPORT_FORMAT",
    "AccuracyRow",
    "AccuracySide",
    "ArtifactInfo",
    "ContinuationCases",
    "ContinuationRow",
    "Estimate",
    "EvalSettings",
    "Interval",
    "KVMemory",
    "NllSide",
    "Report",
    "ReportError",
    "ReportPaths",
    "Row",
    "load_report",
    "report_from_dict",
    "report_paths",
    "report_to_dict",
    "report_to_json",
    "write_report",
]
