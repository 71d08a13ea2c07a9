"""Quantized KV at equal bytes: profiled plans at several storages vs full precision, quantization
alone and ``uniform`` (a benchmark, not a test).

At each budget (a fraction of the source model's cache in bfloat16 bytes at --at-context) the
profile is refitted once per storage pair of --storages (``FULL/BUDGET``: the full heads' and
the budgeted heads' storage; ``full/full`` is today's full-precision plan at the same bytes) by
the measured choice on held-out calibration prompts; ``uniform`` is refitted at full precision;
``quant-only`` keeps every head full with the whole cache quantized (4 bits where that fits the
budget, else 2 bits, else it has no row). The row the fit would ship, ``chosen``, is the
storage whose measured choice scored best on the held-out losses (``kvcompile.fit.choice``:
eligibility against ``uniform``, then the mean of the two relative losses), so the eval never
informs it. Every plan and the uncompressed model are evaluated on the same cases in one run
(one exact prefill per case). Prints a Markdown table with each plan's bits per value;
``--write-docs`` replaces that genre's section of docs/BENCHMARKS.md and draws
docs/quant-GENRE.png.

    python bench/quant_sweep.py --budgets 0.125,0.0625 --genre licenses --samples 10
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench/decode.py

import torch  # noqa: E402
from policies import replace_section, save_png  # noqa: E402  (bench/ is on sys.path when run)

from kvcompile.eval.evaluate import EvalConfig, evaluate_systems  # noqa: E402
from kvcompile.eval.report import ContinuationRow, Report, report_from_dict, report_to_dict  # noqa: E402
from kvcompile.fit.choice import losses_over  # noqa: E402
from kvcompile.fit.pipeline import refit_profile, request_from_profile  # noqa: E402
from kvcompile.memory import plan_bits_per_value, plan_memory_ratio  # noqa: E402
from kvcompile.models import load_model  # noqa: E402
from kvcompile.plan import Plan, Storage  # noqa: E402
from kvcompile.profile.record import load_profile, save_profile  # noqa: E402
from kvcompile.runtime.engine import Engine  # noqa: E402
from kvcompile.textsource import GENRES  # noqa: E402

SECTION = "## Quantized KV at equal bytes"
STORAGES = "full/full,k8v8/k8v8,k8v8/k4v4,k4v4/k4v4"
QUANT_ONLY = ("k4v4", "k2v2")
STYLE = {"chosen": ("tab:blue", "o"), "full/full": ("tab:purple", "v"), "uniform": ("tab:orange", "s"),
         "quant-only": ("tab:green", "^")}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--profile", type=Path, default=Path("profiles/smollm2-135m-instruct.yaml"))
    parser.add_argument("--budgets", default="0.25,0.125,0.08333,0.0625,0.04167,0.03125")
    parser.add_argument("--storages", default=STORAGES, help="FULL/BUDGET storage pairs of the profiled plans")
    parser.add_argument("--at-context", type=int, default=4096)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--tasks", default="passkey,multikey,continuation")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--genre", default="licenses", choices=sorted(GENRES))
    parser.add_argument("--refits", type=Path, default=None, help="keep refitted profiles here (reused)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw reports here")
    parser.add_argument("--from-json", type=Path, default=None, help="no run: table (and docs) from --json")
    parser.add_argument("--write-docs", action="store_true")
    return parser.parse_args()


def storage_pair(text: str) -> tuple[Storage, Storage]:
    full, _, budget = text.partition("/")
    return Storage.parse(full), Storage.parse(budget or full)


def quant_only_plan(arch, budget: float, context: int) -> Plan | None:
    """Every head full, the whole cache quantized at the most bits that fit the budget."""
    for name in QUANT_ONLY:
        storage = Storage.parse(name)
        base = Plan.uncompressed(arch.n_layers, arch.n_kv_heads, arch.sliding_windows)
        plan = replace(base, policy="quant-only", layers=tuple(
            replace(layer, full_storage=storage, budget_storage=storage) for layer in base.layers))
        if plan_memory_ratio(plan, arch, context) <= budget:
            return plan
    return None


def held_out_losses(profile, name: str | None = None) -> tuple[float, float] | None:
    """(answer loss, text loss) over the uncompressed model of the plan the measured choice
    shipped (or of its candidate ``name``), from the refitted profile's ``choice`` record (the
    same held-out prompts at every storage: same seed, same length)."""
    choice = profile.choice
    if not choice:
        return None
    from kvcompile.fit.choice import LOSSES, Losses

    picked = next(c for c in choice["candidates"] if c["name"] == (name or choice["chosen"]))
    base = Losses(**{k: float(choice["uncompressed"][k]) for k in LOSSES})
    return losses_over(base, Losses(**{k: float(picked[k]) for k in LOSSES}))


def pick(losses: dict[str, tuple[float, float]], full_precision: str,
         uniform: tuple[float, float]) -> str:
    """The storage the fit would ship (``kvcompile.fit.choice``'s rule): a quantized plan only
    when neither loss exceeds the full-precision plan's (which is no worse than ``uniform``'s),
    then the lowest mean of the two losses, each over ``uniform``'s."""
    ref = losses[full_precision]
    eligible = [n for n, mine in losses.items() if all(m <= r for m, r in zip(mine, ref, strict=True))]

    def score(name: str) -> float:
        return sum(m / r if r > 1e-9 else (0.0 if m <= 1e-9 else float("inf"))
                   for m, r in zip(losses[name], uniform, strict=True)) / 2

    return min(eligible, key=lambda n: (score(n), n != full_precision))


def mark_chosen(meta: dict[str, dict], refitted: dict[str, object]) -> None:
    """Flag, per budget, the profiled row the fit would ship, from the refitted profiles'
    measured choices (``refitted``: row name -> profile)."""
    for budget in {info["budget"] for info in meta.values()}:
        rows = {n: p for n, p in refitted.items() if meta[n]["budget"] == budget}
        full = f"{budget}:profiled full/full"
        losses = {n: held for n, p in rows.items() if (held := held_out_losses(p)) is not None}
        if full in losses and (uniform := held_out_losses(rows[full], "uniform")) is not None:
            for name in rows:
                meta[name].pop("chosen", None)
            meta[pick(losses, full, uniform)]["chosen"] = True


def refit(profile, loaded, args, budget: float, key: str, **changes) -> object:
    kept = args.refits / f"{budget:.4g}-{key.replace('/', '_')}.yaml" if args.refits else None
    if kept is not None and kept.is_file():
        return load_profile(kept)
    request = replace(request_from_profile(profile, budget, args.at_context), **changes)
    measured = request.policy == "profiled"
    result = refit_profile(profile, request, loaded if measured else None)
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        save_profile(result, kept)
    return result


def table(reports: dict[str, Report], meta: dict[str, dict], context: int) -> str:
    first = next(iter(reports.values()))
    header = ["KV budget", "policy", "storage (full/budgeted)", "full heads", f"memory @ {context}", "bits/value"]
    for row in first.rows:
        header += ["NLL Δ", "KL"] if isinstance(row, ContinuationRow) else [f"{row.task}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = ["1", "uncompressed", "bf16", "all", "1.000", "16.0"]
    for row in first.rows:
        base += ["—", "—"] if isinstance(row, ContinuationRow) else [f"{row.baseline.correct}/{row.n}"]
    lines.append("| " + " | ".join(base) + " |")
    for name, report in reports.items():
        info = meta[name]
        policy = info["policy"] + (" (chosen)" if info.get("chosen") else "")
        cells = [info["budget"], policy, info["storage"], str(info["full_heads"]),
                 f"{info['ratio']:.3f}", f"{info['bits']:.1f}"]
        for row in report.rows:
            if isinstance(row, ContinuationRow):
                cells += ["—" if row.nll_increase is None else f"{100 * row.nll_increase:+.2f}%",
                          "—" if row.kl is None else f"{row.kl:.3f}"]
            else:
                cells.append(f"{row.artifact.correct}/{row.n}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(reports: dict[str, Report], meta: dict[str, dict], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first = next(iter(reports.values()))
    fig = Figure(figsize=(4.2 * len(first.rows), 3.6))
    FigureCanvasAgg(fig)
    for index, base_row in enumerate(first.rows):
        ax = fig.add_subplot(1, len(first.rows), index + 1)
        for policy, (color, marker) in STYLE.items():
            points = []
            for name, report in reports.items():
                info = meta[name]
                if policy != ("chosen" if info.get("chosen") else info["policy"] if info["policy"] != "profiled"
                              else info["storage"]):
                    continue
                row = report.rows[index]
                value = row.nll_increase if isinstance(row, ContinuationRow) else row.artifact.accuracy
                if value is not None:
                    points.append((info["ratio"], 100 * value))
            if points:
                ax.plot(*zip(*sorted(points), strict=True), marker=marker, color=color, label=policy)
        if isinstance(base_row, ContinuationRow):
            ax.axhline(0, color="black", linestyle="--", linewidth=1, label="uncompressed")
            ax.set_ylabel("NLL increase (%)")
        else:
            ax.axhline(100 * (base_row.baseline.accuracy or 0), color="black", linestyle="--", linewidth=1,
                       label="uncompressed")
            ax.set_ylabel("accuracy (%)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV bytes / bf16 cache")
        ax.set_title(base_row.task)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.suptitle(title)
    save_png(fig, path)


def write_docs(markdown: str, args: argparse.Namespace, seconds: float) -> None:
    section = f"{SECTION}: {args.genre} text"
    body = (f"{section}\n\nSmolLM2-135M-Instruct, plans refitted from `{args.profile}` at each budget (bytes "
            f"over the source model's bfloat16 cache at {args.at_context} tokens), {args.samples} cases per "
            f"task at {args.length} tokens on {args.genre} text, seed {args.seed}; `chosen` marks the storage "
            f"the measured choice ranks best on held-out calibration prompts. 2 shared CPU cores, "
            f"{seconds / 60:.0f} min. Plot: `docs/quant-{args.genre}.png`. Reproduce: `python "
            f"bench/quant_sweep.py --budgets {args.budgets} --storages {args.storages} --samples {args.samples} "
            f"--genre {args.genre} --seed {args.seed} --write-docs`.\n\n{markdown}\n")
    replace_section(section, body)


def main() -> None:
    args = parse_args()
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        reports = {n: report_from_dict(e["report"], source=str(args.from_json)) for n, e in data["runs"].items()}
        meta = {n: e["meta"] for n, e in data["runs"].items()}
        for info in meta.values():  # files written while the table's label was stored
            info["policy"] = info["policy"].removesuffix(" (chosen)")
        if args.refits:  # the shipped storage again, from the kept refits (the rule may be newer)
            kept = {n: load_profile(args.refits / f"{m['budget']}-{m['storage'].replace('/', '_')}.yaml")
                    for n, m in meta.items() if m["policy"] == "profiled"}
            mark_chosen(meta, kept)
        markdown = table(reports, meta, args.at_context)
        print(markdown)
        if args.write_docs:
            write_docs(markdown, args, data["seconds"])
            plot(reports, meta, Path(f"docs/quant-{args.genre}.png"),
                 f"SmolLM2-135M, {args.genre} text, {args.samples} cases per task, seed {args.seed}")
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded = load_model(args.model)
    arch = loaded.arch
    profile = load_profile(args.profile)
    plans: dict[str, Plan] = {}
    meta: dict[str, dict] = {}

    def add(name: str, plan: Plan, policy: str, storage: str, budget: float, **extra) -> None:
        plans[name] = plan
        meta[name] = {"budget": f"{budget:.4g}", "policy": policy, "storage": storage, "full_heads": plan.n_full,
                      "ratio": plan_memory_ratio(plan, arch, args.at_context),
                      "bits": plan_bits_per_value(plan, args.at_context, arch.head_dim), **extra}
        print(f"[{time.perf_counter() - started:7.0f} s] {name}: ratio {meta[name]['ratio']:.4f}, "
              f"{meta[name]['bits']:.2f} bits/value", flush=True)

    for budget in [float(b) for b in args.budgets.split(",")]:
        refitted = {}
        for pair in args.storages.split(","):
            full, budgeted = storage_pair(pair)
            label = f"{full.name}/{budgeted.name}"
            result = refit(profile, loaded, args, budget, label, full_storage=full, budget_storage=budgeted)
            name = f"{budget:.4g}:profiled {label}"
            add(name, result.plan, "profiled", label, budget)
            refitted[name] = result
        mark_chosen(meta, refitted)
        uniform = refit(profile, loaded, args, budget, "uniform", policy="uniform")
        add(f"{budget:.4g}:uniform", uniform.plan, "uniform", "full/full", budget)
        quant = quant_only_plan(arch, budget, args.at_context)
        if quant is not None:
            add(f"{budget:.4g}:quant-only", quant, "quant-only", quant.layers[0].full_storage.name + " (all)", budget)
    model = loaded.build()
    engine = Engine(model, next(iter(plans.values())), loaded.tokenizer)
    config = EvalConfig(tasks=tuple(args.tasks.split(",")), lengths=(args.length,), samples=args.samples,
                        seed=args.seed, genre=args.genre, agreement_tokens=0)

    def progress(done: int, total: int, label: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f} s] {done}/{total} {label}", flush=True)

    served = {name: plan.to_served(permuted_by=None) for name, plan in plans.items()}
    reports = evaluate_systems(engine, served, config, progress=progress)
    seconds = time.perf_counter() - started
    markdown = table(reports, meta, args.at_context)
    print(markdown)
    if args.json:
        runs = {n: {"report": report_to_dict(r), "meta": meta[n]} for n, r in reports.items()}
        args.json.write_text(json.dumps({"runs": runs, "seconds": seconds}, indent=1))
    if args.write_docs:
        write_docs(markdown, args, seconds)
        plot(reports, meta, Path(f"docs/quant-{args.genre}.png"),
             f"SmolLM2-135M, {args.genre} text, {args.samples} cases per task, seed {args.seed}")


if __name__ == "__main__":
    main()
