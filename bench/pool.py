"""Pool `bench/policies.py --json` runs made with different seeds into one table.

Twenty cases per task leave 95% intervals about 40 points wide; runs with other seeds draw
new needles, depths and texts, so their counts add up. Accuracy is pooled by summing the
correct answers (Wilson interval on the total); NLL, KL and greedy agreement by weighting
each run's mean by its number of cases (tokens for agreement). Only systems present in
every run are pooled.

    python bench/policies.py --budgets 0.125 --seed 1 --json seed1.json
    python bench/pool.py seed0.json seed1.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvcompile.stats import wilson_interval


def pooled_rows(reports: list[dict]) -> dict[tuple[str, int], dict]:
    """Per (task, length): summed counts for both sides, or n-weighted continuation means."""
    rows: dict[tuple[str, int], dict] = {}
    for report in reports:
        for row in report["tasks"]:
            key = (row["task"], row["length"])
            acc = rows.setdefault(key, {"n": 0, "base": 0.0, "art": 0.0, "kl": 0.0, "agree": 0.0, "agree_n": 0})
            n = row["n"]
            acc["n"] += n
            if row["task"] == "continuation":
                acc["base"] += n * row["baseline"]["nll"]
                acc["art"] += n * row["artifact"]["nll"]
                acc["kl"] += n * row["kl"]
                acc["agree"] += row["agreement_n"] * row["agreement"]
                acc["agree_n"] += row["agreement_n"]
            else:
                acc["base"] += row["baseline"]["correct"]
                acc["art"] += row["artifact"]["correct"]
    return rows


def fmt_count(correct: int, n: int) -> str:
    lo, hi = wilson_interval(correct, n)
    return f"{100 * correct / n:.0f}% ({correct}/{n}) [{100 * lo:.0f}, {100 * hi:.0f}]"


def table(runs: list[dict[str, dict]], names: list[str]) -> str:
    pooled = {name: pooled_rows([run[name] for run in runs]) for name in names}
    keys = list(pooled[names[0]])
    header = ["KV budget", "policy", "full heads"]
    for task, length in keys:
        header += [f"{task}@{length} NLL Δ", "KL", "agreement"] if task == "continuation" else [f"{task}@{length}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = ["1", "uncompressed", "all"]
    for key in keys:
        row = pooled[names[0]][key]
        base += ["—"] * 3 if key[0] == "continuation" else [fmt_count(int(row["base"]), row["n"])]
    lines.append("| " + " | ".join(base) + " |")
    for name in names:
        budget, policy = name.split(":")
        cells = [budget, policy, str(runs[0][name].get("full_heads", "?"))]
        for key in keys:
            row = pooled[name][key]
            if key[0] == "continuation":
                cells += [f"{100 * (row['art'] / row['base'] - 1):+.2f}%", f"{row['kl'] / row['n']:.3f}",
                          f"{100 * row['agree'] / max(1, row['agree_n']):.0f}%"]
            else:
                cells.append(fmt_count(int(row["art"]), row["n"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    print(f"seeds {', '.join(map(str, seeds))}\n")
    print(table(runs, names))


if __name__ == "__main__":
    main()
