"""Pool `bench/policies.py --json` runs made with different seeds into one table.

Twenty cases per task leave 95% intervals about 40 points wide; runs with other seeds draw
new needles, depths and texts, so their counts add up. Accuracy is pooled by summing the
correct answers (Wilson interval on the total); NLL, KL and greedy agreement by weighting
each run's mean by its number of cases (tokens for agreement). Only systems present in
every run are pooled; the table is the one `bench/policies.py` prints.

    python bench/policies.py --budgets 0.125 --seed 1 --json seed1.json
    python bench/pool.py seed0.json seed1.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from policies import table  # bench/ is on sys.path when this script runs

from kvcompile.stats import wilson_interval


def _accuracy(correct: int, n: int) -> dict:
    return {"correct": correct, "accuracy": correct / n, "ci95": list(wilson_interval(correct, n))}


def _pooled_task(rows: list[dict]) -> dict:
    """One task row of the report format from the same task's rows of several runs."""
    n = sum(row["n"] for row in rows)
    pooled = {"task": rows[0]["task"], "length": rows[0]["length"], "n": n}
    if rows[0]["task"] != "continuation":
        for side in ("baseline", "artifact"):
            pooled[side] = _accuracy(sum(row[side]["correct"] for row in rows), n)
        return pooled
    base = sum(row["n"] * row["baseline"]["nll"] for row in rows) / n
    art = sum(row["n"] * row["artifact"]["nll"] for row in rows) / n
    tokens = sum(row["agreement_n"] for row in rows)
    pooled.update(
        baseline={"nll": base}, artifact={"nll": art}, nll_increase=art / base - 1,
        kl=sum(row["n"] * row["kl"] for row in rows) / n,
        agreement=sum(row["agreement_n"] * row["agreement"] for row in rows) / tokens, agreement_n=tokens,
    )
    return pooled


def pooled_report(reports: list[dict]) -> dict:
    """The reports of one system over several runs, merged task by task."""
    keys = [(row["task"], row["length"]) for row in reports[0]["tasks"]]
    by_key = {key: [row for report in reports for row in report["tasks"]
                    if (row["task"], row["length"]) == key] for key in keys}
    return {**reports[0], "seed": [report["seed"] for report in reports],
            "tasks": [_pooled_task(rows) for rows in by_key.values()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by bench/policies.py --json")
    args = parser.parse_args()
    runs = []
    for path in args.runs:
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            parser.error(f"cannot read {path}: {err}; pass files written by bench/policies.py --json")
    seeds = sorted({report["seed"] for run in runs for report in run.values()})
    if len(seeds) < len(runs):
        parser.error(f"runs share a seed ({seeds}); pooled runs must use different seeds")
    names = [name for name in runs[0] if all(name in run for run in runs)]
    if not names:
        parser.error("no system is present in every run; pool runs of the same budgets and policies")
    pooled = {name: pooled_report([run[name] for run in runs]) for name in names}
    context = pooled[names[0]]["kv_memory"]["context"]
    print(f"seeds {', '.join(map(str, seeds))}; n per task and length is the sum over runs\n")
    print(table(pooled, names, context))


if __name__ == "__main__":
    main()
