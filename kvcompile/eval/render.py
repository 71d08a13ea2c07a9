"""A :class:`~kvcompile.eval.report.Report` for the humans who review an artifact: Markdown and a PNG.

Both are written beside the JSON by :func:`kvcompile.eval.report.write_report`; the
Markdown is also what ``kvcompile eval`` prints.
"""

from __future__ import annotations

import io
import math
import os
from typing import TYPE_CHECKING

from kvcompile.runtime.slots import format_bytes

if TYPE_CHECKING:  # the record module imports this one to write the files
    from kvcompile.eval.report import AccuracyRow, ContinuationRow, Interval, Report

_DASH = "—"


def _cell(text: object) -> str:
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


def _human_bytes(n: float | None) -> str:
    return _DASH if n is None else format_bytes(n)


def _pct(x: float | None, digits: int = 1) -> str:
    return _DASH if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}%"


def _f(x: float | None, spec: str = ".4f") -> str:
    return _DASH if x is None or not math.isfinite(x) else format(x, spec)


def _seconds(x: float | None) -> str:
    return _DASH if x is None else f"{x:.1f} s"


def _interval(ci: Interval | None, scale: float = 1.0, spec: str = ".4f") -> str:
    """`` [lo, hi]`` of a stored interval, or nothing."""
    if ci is None:
        return ""
    return f" [{format(scale * ci[0], spec)}, {format(scale * ci[1], spec)}]"


def _header(report: Report) -> list[str]:
    art, mem = report.artifact, report.memory
    lines = ["# kvcompile evaluation report", ""]
    lines.append(f"- **model**: `{art and art.model_id or _DASH}`")
    art_line = f"- **artifact**: `{art and art.path or _DASH}`"
    extras = []
    if art and art.policy is not None:
        extras.append(f"policy `{art.policy}`")
    if art and art.fingerprint is not None:
        extras.append(f"fingerprint `{art.fingerprint}`")
    if extras:
        art_line += " (" + ", ".join(extras) + ")"
    lines.append(art_line)
    if mem is not None:
        at = f" at {mem.context:,} tokens" if mem.context is not None else ""
        values = (f"values counted in {mem.baseline_dtype}" if mem.baseline_dtype is not None
                  else "baseline dtype not stated")
        lines.append(
            f"- **KV memory**{at}: **{_pct(mem.checked_ratio())}** of the source model's cache "
            f"({_human_bytes(mem.artifact_bytes)} vs {_human_bytes(mem.baseline_bytes)}, {values})"
        )
        if mem.allocated_bytes is not None:
            dtype = f" in {mem.allocated_dtype}" if mem.allocated_dtype else ""
            lines.append(f"- **KV state allocated by the runtime**{at}: "
                         f"{_human_bytes(mem.allocated_bytes)}{dtype} (not a ratio)")
    lines.append(f"- **wall time**: {_seconds(report.wall_time_s)}")
    versions = [f"kvcompile {report.kvcompile_version or _DASH}"]
    versions += [f"{k} {v}" for k, v in (report.created_with or {}).items()]
    seed = _DASH if report.seed is None else report.seed
    lines.append(f"- **seed**: {seed}; **versions**: " + ", ".join(versions))
    lines.append("")
    return lines


def _memory_column(report: Report) -> str:
    """The rows' ratio column, naming its baseline dtype when it is not bfloat16."""
    dtype = report.memory.baseline_dtype if report.memory is not None else None
    return "KV memory" if dtype in (None, "bfloat16") else f"KV memory (vs {dtype})"


def _accuracy_section(rows: list[AccuracyRow], memory: str) -> list[str]:
    by_task: dict[str, list[AccuracyRow]] = {}
    for row in rows:
        by_task.setdefault(row.task, []).append(row)
    lines = ["## Accuracy", ""]
    for task, task_rows in by_task.items():
        lines += [
            f"### {task}",
            "",
            f"| length | baseline | artifact | drop | {memory} | time (baseline / artifact) |",
            "|---:|---|---|---:|---:|---:|",
        ]
        for row in sorted(task_rows, key=lambda r: r.length):
            base = row.baseline.estimate(row.n)
            art = row.artifact.estimate(row.n)
            drop = f"{100 * (base.value - art.value):+.1f} pp" if base and art else _DASH
            times = f"{_seconds(row.baseline.wall_time_s)} / {_seconds(row.artifact.wall_time_s)}"
            cells = [
                row.length,
                format_proportion(*(base or (None, None, None)), row.n),
                format_proportion(*(art or (None, None, None)), row.n),
                drop,
                _pct(row.memory_ratio),
                times,
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    return lines


def _continuation_section(rows: list[ContinuationRow], memory: str) -> list[str]:
    lines = [
        "## Continuation",
        "",
        "| length | samples × tokens | NLL baseline | NLL artifact | Δ NLL [95% CI] | KL [95% CI] "
        f"| greedy agreement | {memory} |",
        "|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for row in sorted(rows, key=lambda r: r.length):
        inc = row.measured_nll_increase()
        kl = _f(row.kl)
        if kl != _DASH:
            kl += _interval(row.kl_ci95)
        lo, hi = row.agreement_ci95 or (None, None)
        n = _DASH if row.n is None else row.n
        tokens = _DASH if row.tokens is None else row.tokens
        change = _DASH
        if inc is not None:
            change = f"{100 * inc:+.2f}%" + _interval(row.nll_increase_ci95, 100, ".2f")
        cells = [
            row.length,
            f"{n} × {tokens}",
            _f(row.baseline.nll),
            _f(row.artifact.nll),
            change,
            kl,
            format_proportion(row.agreement, lo, hi, row.agreement_n),
            _pct(row.memory_ratio),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines.append("")
    return lines


def render_markdown(report: Report) -> str:
    """A reviewable summary: provenance header, accuracy tables, continuation table."""
    lines = _header(report)
    if report.accuracy_rows:
        lines += _accuracy_section(report.accuracy_rows, _memory_column(report))
    if report.continuation_rows:
        lines += _continuation_section(report.continuation_rows, _memory_column(report))
    if not report.rows:
        lines += ["_The report has no task rows._", ""]
    lines += [
        "Accuracy intervals are 95% Wilson score intervals; drop = baseline − artifact in "
        "percentage points; KL is the mean KL(baseline ‖ artifact) per token. Δ NLL, KL and "
        "agreement intervals are 95% normal-approximation intervals over the cases (tokens of "
        "one text are not independent draws; Δ NLL pairs each case's two NLLs). KV memory is all "
        "the artifact's KV state as the runtime allocates it (keys, values, codes, scales, slot "
        "bias, counters) over the source model's own cache, every full-precision value of both "
        "counted at the baseline dtype (bfloat16 unless stated), whatever dtype the run computed "
        "in; the allocated bytes are the runtime's own, in its compute dtype.",
        "",
    ]
    return "\n".join(lines)


def plot_accuracy(report: Report, path: str | os.PathLike[str] | io.IOBase) -> None:
    """PNG of accuracy vs context length, one subplot per accuracy task.

    Uses a bare ``Figure`` on the Agg canvas (no pyplot), so it never touches the global
    backend or needs a display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_task: dict[str, list[AccuracyRow]] = {}
    for row in report.accuracy_rows:
        by_task.setdefault(row.task, []).append(row)

    ncols = max(1, len(by_task))
    fig = Figure(figsize=(4.8 * ncols, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    model = report.artifact.model_id if report.artifact and report.artifact.model_id else "model"
    title = f"{model}: accuracy vs context length"
    ratio = report.memory.checked_ratio() if report.memory is not None else None
    if ratio is not None:  # what the gate checks: of the bytes, never an edited ratio
        dtype = report.memory.baseline_dtype if report.memory is not None else None
        vs = "" if dtype in (None, "bfloat16") else f" vs {dtype}"
        title += f" (KV memory {_pct(ratio)}{vs})"
    fig.suptitle(title)

    if not by_task:
        ax = axes[0]
        ax.text(0.5, 0.5, "no accuracy tasks in this report", ha="center", va="center")
        ax.set_axis_off()
    for ax, (task, task_rows) in zip(axes, by_task.items(), strict=False):
        task_rows = sorted(task_rows, key=lambda r: r.length)
        lengths = [float(r.length) for r in task_rows]
        octaves = math.log2(max(lengths) / min(lengths)) + 1.0  # x-range, with margins
        shift = 0.015 * octaves  # baseline/artifact side by side, so the bars don't overlap
        for side, color, marker, dodge in (
            ("baseline", "tab:gray", "s", -shift),
            ("artifact", "tab:blue", "o", shift),
        ):
            xs, ys, lo_err, hi_err = [], [], [], []
            for x, row in zip(lengths, task_rows, strict=True):
                est = (row.baseline if side == "baseline" else row.artifact).estimate(row.n)
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


__all__ = ["format_proportion", "plot_accuracy", "render_markdown"]
