"""Evaluation reports (format ``kvcompile-report/1``): JSON, Markdown and a PNG plot.

The JSON is the record a CI gate reads; the Markdown and the plot are for the humans who
review the artifact. All three are written from the same dict in one call.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcompile.errors import KVCompileError
from kvcompile.stats import wilson_interval
from kvcompile.yamlio import atomic_write_bytes

REPORT_FORMAT = "kvcompile-report/1"
ACCURACY_TASKS = ("passkey", "multikey")
_SUFFIXES = (".json", ".md", ".png")
_DASH = "—"


class ReportError(KVCompileError, ValueError):
    """A report file that cannot be read or is not a ``kvcompile-report/1`` document."""


# ----------------------------------------------------------------------------- paths


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


# ----------------------------------------------------------------------------- I/O


def _jsonable(obj: Any) -> Any:
    """Plain JSON types only: tuples become lists, NaN/inf become null (strict JSON)."""
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


def report_to_json(report: Mapping[str, Any]) -> str:
    return json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n"


def write_report(report: Mapping[str, Any], out_path: str | os.PathLike[str]) -> ReportPaths:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png``; return their paths.

    Everything is rendered in memory first, so a rendering error writes nothing; each
    file is then replaced atomically. Parent directories are created.
    """
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


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
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
    check_report(data, source=str(p))
    return data


def check_report(report: Any, source: str | None = None) -> None:
    """Raise :class:`ReportError` unless ``report`` looks like a ``kvcompile-report/1``."""
    where = f"{source}: " if source else ""
    if not isinstance(report, Mapping):
        raise ReportError(f"{where}expected a JSON object, got {type(report).__name__}")
    fmt = report.get("format")
    if fmt != REPORT_FORMAT:
        raise ReportError(f"{where}format: expected {REPORT_FORMAT!r}, got {fmt!r}")
    tasks = report.get("tasks")
    if not isinstance(tasks, list):
        raise ReportError(f"{where}tasks: expected a list, got {type(tasks).__name__}")
    for i, row in enumerate(tasks):
        if not isinstance(row, Mapping):
            raise ReportError(f"{where}tasks[{i}]: expected a mapping, got {type(row).__name__}")


# ----------------------------------------------------------------------------- row access


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _side(row: Mapping[str, Any], side: str) -> Mapping[str, Any]:
    s = row.get(side)
    return s if isinstance(s, Mapping) else {}


def is_accuracy_row(row: Mapping[str, Any]) -> bool:
    """Rows scored as right/wrong (passkey, multikey, or any row carrying accuracies)."""
    if row.get("task") in ACCURACY_TASKS:
        return True
    return any(
        k in _side(row, s) for s in ("baseline", "artifact") for k in ("accuracy", "correct")
    )


def is_continuation_row(row: Mapping[str, Any]) -> bool:
    return row.get("task") == "continuation" or "nll" in _side(row, "baseline")


def accuracy_of(row: Mapping[str, Any], side: str) -> tuple[float, float, float] | None:
    """``(accuracy, lo, hi)`` for one side of an accuracy row, or None if absent.

    Uses the stored point estimate and interval; falls back to ``correct / n`` and the
    Wilson interval when they are missing, so hand-written reports still gate.
    """
    s = _side(row, side)
    n = _int(row.get("n"))
    correct = _int(s.get("correct"))
    acc = _num(s.get("accuracy"))
    if acc is None and correct is not None and n:
        acc = correct / n
    if acc is None:
        return None
    ci = s.get("ci95")
    if isinstance(ci, Sequence) and not isinstance(ci, str) and len(ci) == 2:
        lo, hi = _num(ci[0]), _num(ci[1])
        if lo is not None and hi is not None:
            return acc, lo, hi
    if correct is not None and n is not None and 0 <= correct <= n:
        lo, hi = wilson_interval(correct, n)
        return acc, lo, hi
    return acc, math.nan, math.nan


def row_label(row: Mapping[str, Any]) -> str:
    return f"{row.get('task', '?')}@{row.get('length', '?')}"


# ----------------------------------------------------------------------------- Markdown


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_proportion(p: float | None, lo: float | None, hi: float | None, n: int | None) -> str:
    """``95.0% [86.1, 98.6] (n=20)``: the accuracy with its interval, in percent."""
    if p is None:
        return _DASH
    out = f"{100 * p:.1f}%"
    if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
        out += f" [{100 * lo:.1f}, {100 * hi:.1f}]"
    if n is not None:
        out += f" (n={n})"
    return out


def _human_bytes(n: Any) -> str:
    v = _num(n)
    if v is None:
        return _DASH
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    raise AssertionError("unreachable")


def _pct(x: Any, digits: int = 1) -> str:
    v = _num(x)
    return _DASH if v is None else f"{100 * v:.{digits}f}%"


def _f(x: Any, spec: str = ".4f") -> str:
    v = _num(x)
    return _DASH if v is None else format(v, spec)


def _seconds(x: Any) -> str:
    v = _num(x)
    return _DASH if v is None else f"{v:.1f} s"


def _header(report: Mapping[str, Any]) -> list[str]:
    art = report.get("artifact") if isinstance(report.get("artifact"), Mapping) else {}
    mem = report.get("kv_memory") if isinstance(report.get("kv_memory"), Mapping) else {}
    created = report.get("created_with") if isinstance(report.get("created_with"), Mapping) else {}
    lines = ["# kvcompile evaluation report", ""]
    lines.append(f"- **model**: `{art.get('model_id', _DASH)}`")
    art_line = f"- **artifact**: `{art.get('path', _DASH)}`"
    extras = []
    if art.get("policy") is not None:
        extras.append(f"policy `{art['policy']}`")
    if art.get("fingerprint") is not None:
        extras.append(f"fingerprint `{art['fingerprint']}`")
    if extras:
        art_line += " (" + ", ".join(extras) + ")"
    lines.append(art_line)
    if mem:
        ctx = _int(mem.get("context"))
        at = f" at {ctx:,} tokens" if ctx is not None else ""
        lines.append(
            f"- **KV memory**{at}: **{_pct(mem.get('ratio'))}** of the uncompressed cache "
            f"({_human_bytes(mem.get('artifact_bytes'))} vs "
            f"{_human_bytes(mem.get('baseline_bytes'))})"
        )
    lines.append(f"- **wall time**: {_seconds(report.get('wall_time_s'))}")
    versions = [f"kvcompile {report.get('kvcompile_version', _DASH)}"]
    versions += [f"{k} {v}" for k, v in created.items()]
    lines.append(f"- **seed**: {report.get('seed', _DASH)}; **versions**: " + ", ".join(versions))
    lines.append("")
    return lines


def _accuracy_section(rows: list[Mapping[str, Any]]) -> list[str]:
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_task.setdefault(str(row.get("task", "?")), []).append(row)
    lines = ["## Accuracy", ""]
    for task, task_rows in by_task.items():
        lines += [
            f"### {task}",
            "",
            "| length | baseline | artifact | drop | KV memory | time (baseline / artifact) |",
            "|---:|---|---|---:|---:|---:|",
        ]
        for row in sorted(task_rows, key=_length_key):
            n = _int(row.get("n"))
            base = accuracy_of(row, "baseline")
            art = accuracy_of(row, "artifact")
            drop = f"{100 * (base[0] - art[0]):+.1f} pp" if base and art else _DASH
            times = (
                f"{_seconds(_side(row, 'baseline').get('wall_time_s'))} / "
                f"{_seconds(_side(row, 'artifact').get('wall_time_s'))}"
            )
            cells = [
                row.get("length", _DASH),
                format_proportion(*(base or (None, None, None)), n),
                format_proportion(*(art or (None, None, None)), n),
                drop,
                _pct(row.get("memory_ratio")),
                times,
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    return lines


def _continuation_section(rows: list[Mapping[str, Any]]) -> list[str]:
    lines = [
        "## Continuation",
        "",
        "| length | samples × tokens | NLL baseline | NLL artifact | Δ NLL [95% CI] | KL [95% CI] "
        "| greedy agreement | KV memory |",
        "|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for row in sorted(rows, key=_length_key):
        base, art = _side(row, "baseline"), _side(row, "artifact")
        inc = _num(row.get("nll_increase"))
        bn, an = _num(base.get("nll")), _num(art.get("nll"))
        if inc is None and bn and an is not None:
            inc = an / bn - 1.0
        kl = _f(row.get("kl"))
        if kl != _DASH:
            kl += _interval(row.get("kl_ci95"))
        agree_ci = row.get("agreement_ci95")
        lo = hi = None
        if isinstance(agree_ci, Sequence) and len(agree_ci) == 2:
            lo, hi = _num(agree_ci[0]), _num(agree_ci[1])
        samples = f"{row.get('n', _DASH)} × {row.get('tokens', _DASH)}"
        cells = [
            row.get("length", _DASH),
            samples,
            _f(bn),
            _f(an),
            _DASH if inc is None else f"{100 * inc:+.2f}%" + _interval(row.get("nll_increase_ci95"), 100, ".2f"),
            kl,
            format_proportion(_num(row.get("agreement")), lo, hi, _int(row.get("agreement_n"))),
            _pct(row.get("memory_ratio")),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines.append("")
    return lines


def _interval(ci: Any, scale: float = 1.0, spec: str = ".4f") -> str:
    """`` [lo, hi]`` of a stored two-number interval, or nothing."""
    if isinstance(ci, Sequence) and not isinstance(ci, str) and len(ci) == 2:
        lo, hi = _num(ci[0]), _num(ci[1])
        if lo is not None and hi is not None:
            return f" [{format(scale * lo, spec)}, {format(scale * hi, spec)}]"
    return ""


def _length_key(row: Mapping[str, Any]) -> tuple[int, str]:
    length = _int(row.get("length"))
    return (length if length is not None else -1, str(row.get("length")))


def render_markdown(report: Mapping[str, Any]) -> str:
    """A reviewable summary: provenance header, accuracy tables, continuation table."""
    rows = [r for r in report.get("tasks") or [] if isinstance(r, Mapping)]
    acc_rows = [r for r in rows if is_accuracy_row(r)]
    cont_rows = [r for r in rows if not is_accuracy_row(r) and is_continuation_row(r)]
    other = [r for r in rows if not is_accuracy_row(r) and not is_continuation_row(r)]
    lines = _header(report)
    if acc_rows:
        lines += _accuracy_section(acc_rows)
    if cont_rows:
        lines += _continuation_section(cont_rows)
    if other:
        labels = ", ".join(row_label(r) for r in other)
        lines += [f"Rows of unknown kind, not tabulated: {labels}", ""]
    if not rows:
        lines += ["_The report has no task rows._", ""]
    lines += [
        "Accuracy intervals are 95% Wilson score intervals; drop = baseline − artifact in "
        "percentage points; KL is the mean KL(baseline ‖ artifact) per token. Δ NLL, KL and "
        "agreement intervals are 95% normal-approximation intervals over the cases (tokens of "
        "one text are not independent draws; Δ NLL pairs each case's two NLLs). KV memory is the "
        "artifact's allocated KV buffers over the uncompressed model's.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plot


def plot_accuracy(report: Mapping[str, Any], path: str | os.PathLike[str] | io.IOBase) -> None:
    """PNG of accuracy vs context length, one subplot per accuracy task.

    Uses a bare ``Figure`` on the Agg canvas (no pyplot), so it never touches the global
    backend or needs a display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in report.get("tasks") or [] if isinstance(r, Mapping) and is_accuracy_row(r)]
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if _int(row.get("length")) is not None:
            by_task.setdefault(str(row.get("task", "?")), []).append(row)

    ncols = max(1, len(by_task))
    fig = Figure(figsize=(4.8 * ncols, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    art = report.get("artifact") if isinstance(report.get("artifact"), Mapping) else {}
    mem = report.get("kv_memory") if isinstance(report.get("kv_memory"), Mapping) else {}
    title = f"{art.get('model_id', 'model')}: accuracy vs context length"
    if _num(mem.get("ratio")) is not None:
        title += f" (KV memory {_pct(mem.get('ratio'))})"
    fig.suptitle(title)

    if not by_task:
        ax = axes[0]
        ax.text(0.5, 0.5, "no accuracy tasks in this report", ha="center", va="center")
        ax.set_axis_off()
    for ax, (task, task_rows) in zip(axes, by_task.items(), strict=False):
        task_rows = sorted(task_rows, key=_length_key)
        lengths = [float(r["length"]) for r in task_rows]
        octaves = math.log2(max(lengths) / min(lengths)) + 1.0  # x-range, with margins
        shift = 0.015 * octaves  # baseline/artifact side by side, so the bars don't overlap
        for side, color, marker, dodge in (
            ("baseline", "tab:gray", "s", -shift),
            ("artifact", "tab:blue", "o", shift),
        ):
            xs, ys, lo_err, hi_err = [], [], [], []
            for x, row in zip(lengths, task_rows, strict=True):
                est = accuracy_of(row, side)
                if est is None:
                    continue
                acc, lo, hi = est
                xs.append(x * 2**dodge)
                ys.append(acc)
                lo_err.append(max(0.0, acc - lo) if math.isfinite(lo) else 0.0)
                hi_err.append(max(0.0, hi - acc) if math.isfinite(hi) else 0.0)
            if xs:
                ax.errorbar(
                    xs,
                    ys,
                    yerr=[lo_err, hi_err],
                    label=side,
                    color=color,
                    marker=marker,
                    capsize=3,
                    linewidth=1.5,
                )
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(lengths) * 2**-0.5, max(lengths) * 2**0.5)
        ax.set_xticks(lengths, [f"{int(x):,}" for x in lengths])
        ax.minorticks_off()
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("accuracy (95% Wilson CI)")
        ax.set_title(task)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower left")
    if isinstance(path, io.IOBase):
        fig.savefig(path, format="png", dpi=110)
    else:
        fig.savefig(os.fspath(path), format="png", dpi=110)
