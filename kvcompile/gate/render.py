"""The gate's tables as text: the pass/fail table of a report and the sample-size plan.

ASCII-boxed (``rich``), so they read the same in a CI log; cells are ``Text`` objects, so
brackets in rule names are never read as markup.
"""

from __future__ import annotations

import io

from kvcompile.gate.checks import GateOutcome
from kvcompile.gate.planning import SampleNeed
from kvcompile.gate.power import POWER


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def render_table(outcome: GateOutcome, *, color: bool = False, width: int = 140) -> str:
    """The pass/fail table; ``color=True`` adds ANSI colours (an interactive terminal)."""
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
            Text(str(r.rule.index)),
            Text("PASS" if r.passed else "FAIL", style=style),
            Text(r.rule.description),
            Text(r.task or "-"),
            Text("-" if r.length is None else str(r.length)),
            Text(_fmt(r.value)),
            Text(f"{r.rule.threshold:g}"),
            Text("-" if r.power.n is None else str(r.power.n)),
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


__all__ = ["render_plan", "render_table"]
