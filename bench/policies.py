"""Compare plans at equal memory: profiled vs uniform (StreamingLLM) vs pyramid (PyramidKV).

Refits the profile's statistics at each KV budget (fractions of the uncompressed cache at
--at-context), then evaluates every plan and the uncompressed baseline on the same cases
in one run (one exact prefill per case, shared by all plans). Prints a Markdown table and,
with --write-docs, replaces the "Policies at equal memory" section of docs/BENCHMARKS.md.

    python bench/policies.py --profile profiles/smollm2-135m-instruct.yaml --samples 20
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from kvcompile.evaluate import EvalConfig, evaluate_systems
from kvcompile.fitting import FitRequest, fit
from kvcompile.models import load_model
from kvcompile.profile_io import load_profile
from kvcompile.profiling import stats_from_profile
from kvcompile.runtime.engine import Engine

SECTION = "## Policies at equal memory"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--profile", type=Path, default=Path("profiles/smollm2-135m-instruct.yaml"))
    parser.add_argument("--budgets", default="0.25,0.125,0.0625")
    parser.add_argument("--policies", default="profiled,uniform,pyramid")
    parser.add_argument("--at-context", type=int, default=4096)
    parser.add_argument("--lengths", default="4096")
    parser.add_argument("--tasks", default="passkey,multikey,continuation")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw reports here")
    parser.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    return parser.parse_args()


def fmt_acc(side: dict) -> str:
    lo, hi = side["ci95"]
    return f"{100 * side['accuracy']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def table(reports: dict[str, dict], names: list[str], context: int) -> str:
    tasks = []
    for row in next(iter(reports.values()))["tasks"]:
        if (row["task"], row["length"]) not in tasks:
            tasks.append((row["task"], row["length"]))
    header = ["KV budget", "policy", "full heads", f"memory @ {context}"]
    for task, length in tasks:
        header += [f"{task}@{length} NLL Δ", "KL", "agreement"] if task == "continuation" else [f"{task}@{length}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    first = reports[names[0]]
    base_cells = ["1", "uncompressed", "all", "1.000"]
    for row in first["tasks"]:
        base_cells += ["—", "—", "—"] if row["task"] == "continuation" else [fmt_acc(row["baseline"])]
    lines.append("| " + " | ".join(base_cells) + " |")
    for name in names:
        report = reports[name]
        budget, policy = name.split(":")
        cells = [budget, policy, str(report["full_heads"]), f"{report['kv_memory']['ratio']:.3f}"]
        for row in report["tasks"]:
            if row["task"] == "continuation":
                cells += [f"{100 * row['nll_increase']:+.2f}%", f"{row['kl']:.3f}", f"{100 * row['agreement']:.0f}%"]
            else:
                cells.append(fmt_acc(row["artifact"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_docs(markdown: str, args: argparse.Namespace, seconds: float) -> None:
    path = Path("docs/BENCHMARKS.md")
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    body = (
        f"{SECTION}\n\nSmolLM2-135M-Instruct, plans refitted from `{args.profile}` at each budget "
        f"(fraction of the uncompressed KV cache at {args.at_context} tokens); {args.samples} cases per "
        f"task and length, seed {args.seed}; accuracy with 95% Wilson intervals; continuation: NLL "
        f"increase and KL against the uncompressed model, greedy agreement over 32 tokens. "
        f"2 CPU cores, {seconds / 60:.0f} min. Reproduce: `python bench/policies.py --samples {args.samples} "
        f"--write-docs`.\n\n{markdown}\n"
    )
    pattern = re.compile(rf"{re.escape(SECTION)}\n.*?(?=\n## |\Z)", re.S)
    text = pattern.sub(body.rstrip("\n") + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    path.write_text(text)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    profile = load_profile(args.profile)
    stats = stats_from_profile(profile)
    plans = {}
    full_heads = {}
    for budget in [float(b) for b in args.budgets.split(",")]:
        for policy in args.policies.split(","):
            request = FitRequest(kv_budget=budget, at_context=args.at_context, policy=policy)
            result = fit(stats if policy == "profiled" else None, loaded.arch, request)
            name = f"{budget:g}:{policy}"
            plans[name] = result.plan
            full_heads[name] = result.plan.n_full
    model = loaded.build()
    engine = Engine(model, next(iter(plans.values())), loaded.tokenizer)
    config = EvalConfig(tasks=tuple(args.tasks.split(",")), lengths=tuple(int(x) for x in args.lengths.split(",")),
                        samples=args.samples, seed=args.seed)
    started = time.perf_counter()

    def progress(done: int, total: int, label: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f} s] {done}/{total} {label}", flush=True)

    reports = evaluate_systems(engine, plans, config, reorder=True, progress=progress)
    for name in reports:
        reports[name]["full_heads"] = full_heads[name]
    seconds = time.perf_counter() - started
    markdown = table(reports, list(plans), args.at_context)
    print(markdown)
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))
    if args.write_docs:
        write_docs(markdown, args, seconds)


if __name__ == "__main__":
    main()
