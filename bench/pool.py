"""Pool `bench/policies.py --json` runs made with different seeds into one table.

Twenty cases per task leave 95% intervals about 40 points wide; runs with other seeds draw
new needles, depths and texts, so their counts add up. Accuracy is pooled by summing the
correct answers (Wilson interval on the total); NLL, KL and greedy agreement by weighting
each run's mean by its number of cases (tokens for agreement). Only systems present in
every run are pooled; the table is the one `bench/policies.py` prints, and ``--plot`` draws its
figure.

    python bench/policies.py --budgets 0.125 --seed 1 --json seed1.json
    python bench/pool.py seed0.json seed1.json --plot docs/policies-pooled.png
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from policies import load_runs, plot, table  # bench/ is on sys.path when this script runs

from kvcompile.errors import KVCompileError
from kvcompile.eval.report import AccuracyRow, AccuracySide, ContinuationRow, NllSide, Report, Row
from kvcompile.stats import nll_increase, wilson_interval


def _accuracy(correct: int, n: int) -> AccuracySide:
    return AccuracySide(correct=correct, accuracy=correct / n, ci95=wilson_interval(correct, n))


def _need(value: float | None) -> float:
    if value is None:
        raise SystemExit("a run's report lacks a count or mean the pool needs; pass complete runs")
    return value


def _pooled_task(rows: list[Row]) -> Row:
    """One task row from the same task's rows of several runs."""
    first = rows[0]
    n = sum(int(_need(row.n)) for row in rows)
    if isinstance(first, AccuracyRow):
        acc = [row for row in rows if isinstance(row, AccuracyRow)]
        return AccuracyRow(first.task, first.length, n,
                           baseline=_accuracy(sum(int(_need(r.baseline.correct)) for r in acc), n),
                           artifact=_accuracy(sum(int(_need(r.artifact.correct)) for r in acc), n))
    cont = [row for row in rows if isinstance(row, ContinuationRow)]
    base = sum(_need(r.n) * _need(r.baseline.nll) for r in cont) / n
    art = sum(_need(r.n) * _need(r.artifact.nll) for r in cont) / n
    agreement, tokens = None, None  # runs with --agreement-tokens 0 have none
    if all(r.agreement_n for r in cont):
        tokens = sum(int(_need(r.agreement_n)) for r in cont)
        agreement = sum(_need(r.agreement_n) * _need(r.agreement) for r in cont) / tokens
    return ContinuationRow(
        first.task, first.length, n, baseline=NllSide(nll=base), artifact=NllSide(nll=art),
        nll_increase=nll_increase(art, base), kl=sum(_need(r.n) * _need(r.kl) for r in cont) / n,
        agreement=agreement, agreement_n=tokens,
    )


def pooled_report(reports: list[Report]) -> Report:
    """The reports of one system over several runs, merged task by task."""
    keys = [(row.task, row.length) for row in reports[0].rows]
    by_key = {key: [row for report in reports for row in report.rows if (row.task, row.length) == key]
              for key in keys}
    return replace(reports[0], rows=tuple(_pooled_task(rows) for rows in by_key.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by bench/policies.py --json")
    parser.add_argument("--plot", type=Path, default=None, help="also draw the pooled table's figure here")
    parser.add_argument("--title", default="SmolLM2-135M, pooled seeds")
    args = parser.parse_args()
    runs = []
    full_heads: dict[str, int] = {}
    storage: dict[str, tuple[str, float]] = {}
    for path in args.runs:
        try:
            run, heads, stored = load_runs(path)
        except (OSError, json.JSONDecodeError, KeyError, KVCompileError) as err:
            parser.error(f"cannot read {path}: {err}; pass files written by bench/policies.py --json")
        runs.append(run)
        full_heads = {**heads, **full_heads}
        storage = {**stored, **storage}
    seeds = sorted({report.seed for run in runs for report in run.values() if report.seed is not None})
    if len(seeds) < len(runs):
        parser.error(f"runs share a seed ({seeds}); pooled runs must use different seeds")
    names = [name for name in runs[0] if all(name in run for run in runs)]
    if not names:
        parser.error("no system is present in every run; pool runs of the same budgets and policies")
    pooled = {name: pooled_report([run[name] for run in runs]) for name in names}
    memory = pooled[names[0]].memory
    context = memory.context if memory is not None and memory.context is not None else 0
    print(f"seeds {', '.join(map(str, seeds))}; n per task and length is the sum over runs\n")
    print(table(pooled, names, context, full_heads, storage))
    if args.plot:
        plot(pooled, names, args.plot, f"{args.title}: seeds {', '.join(map(str, seeds))}")


if __name__ == "__main__":
    main()
