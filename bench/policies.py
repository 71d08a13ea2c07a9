"""Compare plans at equal memory: profiled vs the profiled plan at full precision vs uniform
(StreamingLLM) vs pyramid (PyramidKV) vs quantization alone (every head full, the whole cache in
4-bit codes, or 2-bit where 4 do not fit).

Refits the profile's statistics at each KV budget (fractions of the source model's own cache
at --at-context): the profiled plan by the measured choice on held-out calibration prompts
(``kvcompile fit --model``, which chooses the storage precision too; --proxy keeps the proxy
fit), then evaluates every plan and the uncompressed baseline on the same cases in one run (one
exact prefill per case, shared by all plans), on --genre text. ``profiled-fp`` is the plan that
same measured choice ranks best among its full-precision candidates: what the fit shipped
before it chose precision, at the same bytes. Memory is bytes over the source model's cache in
bfloat16; every row says its storage and bits per value. Prints a Markdown table;
--write-docs replaces that genre's "Policies at equal memory" section of docs/BENCHMARKS.md and
writes docs/policies-GENRE.png (accuracy and NLL against memory).

    python bench/policies.py --profile profiles/smollm2-135m-instruct.yaml --samples 20 --genre licenses
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

# sleeping OpenMP workers: spinning ones stall every small op on a shared machine (bench/decode.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from kvcompile.arch import ArchSpec
from kvcompile.eval.evaluate import EvalConfig, evaluate_systems
from kvcompile.eval.report import (
    AccuracySide,
    ContinuationRow,
    EvalSettings,
    Report,
    report_from_dict,
    report_to_dict,
)
from kvcompile.fit.choice import LOSSES, UNCOMPRESSED, Losses, candidates, choose
from kvcompile.fit.pipeline import refit_profile, request_from_profile, stats_from_profile
from kvcompile.memory import budget_bytes, plan_bits_per_value, plan_bytes
from kvcompile.models import load_model
from kvcompile.plan import LayerPlan, Plan, Storage
from kvcompile.profile.record import Profile, load_profile, save_profile
from kvcompile.runtime.engine import Engine
from kvcompile.textsource import GENRES

SECTION = "## Policies at equal memory"
SWEEP = (1 / 4, 1 / 8, 1 / 12, 1 / 16, 1 / 24, 1 / 32)
POLICY_STYLE = {"profiled": ("tab:blue", "o"), "profiled-fp": ("tab:purple", "v"), "uniform": ("tab:orange", "s"),
                "pyramid": ("tab:green", "^"), "quantized": ("tab:red", "D")}
PROFILED, FULL_PRECISION = "profiled", "profiled-fp"
QUANTIZED = "quantized"  # the baseline "quantization alone": no head budgeted, every one in codes
QUANTIZED_STORAGES = (Storage(4, 4), Storage(2, 2))  # the first that fits the budget


def quantization_alone(arch: ArchSpec, kv_budget: float, context: int,
                       bytes_per_value: int = 2) -> tuple[Plan | None, str]:
    """Every head full with its whole cache quantized (KIVI-style codes, a full-precision
    residual ring of one group), at 4 bits where its bytes at ``context`` fit ``--kv-budget``
    of the source model's cache, else 2 bits; ``(None, why)`` where neither fits. Sliding layers
    keep the model's own windows (a ring is not quantized). Returns the plan and a line saying
    what it holds."""
    target = budget_bytes(arch, context, kv_budget, bytes_per_value)
    uncompressed = Plan.uncompressed(arch.n_layers, arch.n_kv_heads, arch.sliding_windows)
    tried = []
    for storage in QUANTIZED_STORAGES:
        layers = tuple(layer if layer.sliding else LayerPlan(layer.full_heads, (), None, full_storage=storage)
                       for layer in uncompressed.layers)
        plan = Plan(layers, policy=QUANTIZED)
        size = plan_bytes(plan, arch, context, bytes_per_value)
        if size <= target:
            return plan, f"every head full in {storage.name} ({size} of {target} B)"
        tried.append(f"{storage.name} takes {size} B")
    return None, (f"cannot meet the budget: {kv_budget:g} of the cache at {context} tokens is {target} B; "
                  f"{', '.join(tried)}")


def full_precision_plan(source: Profile, refit: Profile, arch: ArchSpec) -> Plan:
    """The plan ``refit``'s measured choice ranks best when only full-precision candidates
    compete (``choose`` on the losses it recorded), rebuilt from the statistics: today's plan
    at the same bytes without the precision choice. ``refit``'s own plan when that is full
    precision (then it is that plan) or when no choice was measured (the proxy fit)."""
    if refit.choice is None or not refit.plan.quantized:
        return refit.plan
    pool = candidates(stats_from_profile(source), arch, refit.settings, storages=())
    recorded = {row["name"]: row for row in refit.choice["candidates"]}
    losses = {UNCOMPRESSED: Losses(**{k: float(refit.choice["uncompressed"][k]) for k in LOSSES})}
    for candidate in pool:
        if candidate.name not in recorded:
            raise SystemExit(f"{candidate.name!r} is not among the refit's measured candidates; refit again")
        losses[candidate.name] = Losses(**{k: float(recorded[candidate.name][k]) for k in LOSSES})
    best, _ = choose(losses, [c.name for c in pool])
    return next(c for c in pool if c.name == best).result.plan


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--profile", type=Path, default=Path("profiles/smollm2-135m-instruct.yaml"))
    parser.add_argument("--budgets", default=",".join(f"{b:.4g}" for b in SWEEP))
    parser.add_argument("--policies", default=",".join(POLICY_STYLE))
    parser.add_argument("--at-context", type=int, default=4096)
    parser.add_argument("--lengths", default="4096")
    parser.add_argument("--tasks", default="passkey,multikey,continuation")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--genre", default="pydoc", choices=sorted(GENRES), help="text the cases are built on")
    parser.add_argument("--proxy", action="store_true", help="profiled: the proxy fit, no measured choice")
    parser.add_argument("--refits", type=Path, default=None,
                        help="directory keeping the refitted profiles (reused when present, e.g. across genres)")
    parser.add_argument("--plans-only", action="store_true", help="refit (and save to --refits), then stop")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None,
                        help="no run: one table (and docs, plot) from --json files of runs with the same seed, genre, "
                             "lengths and samples but other budgets or tasks; the wall time is their sum")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--agreement-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw reports here")
    parser.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    return parser.parse_args()


def fmt_acc(side: AccuracySide, n: int | None) -> str:
    estimate = side.estimate(n)
    if estimate is None:
        return "—"
    return f"{100 * estimate.value:.0f}% [{100 * estimate.lo:.0f}, {100 * estimate.hi:.0f}]"


def _num(value: float | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
    return "—" if value is None else format(scale * value, spec) + unit


def _ratio(report: Report) -> float | None:
    return report.memory.ratio if report.memory is not None else None


def storage_of(plan: Plan, context: int, head_dim: int) -> tuple[str, float]:
    """(the storages of the plan's head groups, its bits per value at ``context``): one name
    when every group stores alike, else ``full heads / budgeted heads``."""
    full = sorted({layer.full_storage.name for layer in plan.layers if layer.full_heads and not layer.sliding})
    budgeted = sorted({layer.budget_storage.name for layer in plan.layers
                       if layer.budgeted_heads and not layer.sliding})
    names = set(full) | set(budgeted)
    label = names.pop() if len(names) == 1 else f"{','.join(full) or '—'} / {','.join(budgeted) or '—'}"
    return label, plan_bits_per_value(plan, context, head_dim)


def dump_runs(reports: Mapping[str, Report], full_heads: Mapping[str, int],
              chosen: Mapping[str, str] | None = None,
              storage: Mapping[str, tuple[str, float]] | None = None) -> str:
    """``--json``: each system's report in its file form, with the bench's full-head count,
    measured choice and storage beside it (what --from-json and bench/pool.py read back)."""
    out = {}
    for name, report in reports.items():
        extra = {"chosen": chosen[name]} if chosen and name in chosen else {}
        if storage and name in storage:
            extra["storage"], extra["bits_per_value"] = storage[name]
        out[name] = {**report_to_dict(report), "full_heads": full_heads[name], **extra}
    return json.dumps(out, indent=2)


def load_runs(path: Path) -> tuple[dict[str, Report], dict[str, int], dict[str, tuple[str, float]]]:
    """The reports, full-head counts and storages (where recorded) of a ``--json`` file
    (:func:`dump_runs`)."""
    data = json.loads(path.read_text())
    reports = {name: report_from_dict(entry, source=f"{path}: {name}") for name, entry in data.items()}
    storage = {name: (str(entry["storage"]), float(entry["bits_per_value"]))
               for name, entry in data.items() if "storage" in entry}
    return reports, {name: int(entry["full_heads"]) for name, entry in data.items()}, storage


def table(reports: Mapping[str, Report], names: list[str], context: int, full_heads: Mapping[str, int],
          storage: Mapping[str, tuple[str, float]] | None = None) -> str:
    """One row per system; ``storage`` (name -> (storages, bits per value)) adds two columns."""
    tasks = []
    for row in next(iter(reports.values())).rows:
        if (row.task, row.length) not in tasks:
            tasks.append((row.task, row.length))
    header = ["KV budget", "policy", "full heads", f"memory @ {context}"]
    if storage:
        header += ["storage", "bits/value"]
    for task, length in tasks:
        header += [f"{task}@{length} NLL Δ", "KL", "agreement"] if task == "continuation" else [f"{task}@{length}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    first = reports[names[0]]
    base_cells = ["1", "uncompressed", "all", "1.000"] + (["bf16", "16.0"] if storage else [])
    for row in first.rows:
        base_cells += ["—", "—", "—"] if isinstance(row, ContinuationRow) else [fmt_acc(row.baseline, row.n)]
    lines.append("| " + " | ".join(base_cells) + " |")
    for name in names:
        report = reports[name]
        budget, policy = name.split(":")
        cells = [budget, policy, str(full_heads[name]), _num(_ratio(report), ".3f")]
        if storage:
            label, bits = storage.get(name, ("—", None))
            cells += [label, _num(bits, ".1f")]
        for row in report.rows:
            if isinstance(row, ContinuationRow):
                cells += [_num(row.nll_increase, "+.2f", 100, "%"), _num(row.kl, ".3f"),
                          _num(row.agreement, ".0f", 100, "%")]
            else:
                cells.append(fmt_acc(row.artifact, row.n))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(reports: Mapping[str, Report], names: list[str], path: Path, title: str) -> None:
    """Accuracy per retrieval task and continuation NLL increase against KV memory, one line per policy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first = next(iter(reports.values()))
    panels = [(row.task, row.length) for row in first.rows]
    fig = Figure(figsize=(4.2 * len(panels), 3.6))
    FigureCanvasAgg(fig)
    for index, (task, length) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), index + 1)
        for policy, (color, marker) in POLICY_STYLE.items():
            points = []
            for name in names:
                if name.split(":")[1] != policy:
                    continue
                report = reports[name]
                row = report.row(task, length)
                value = row.nll_increase if isinstance(row, ContinuationRow) else row.artifact.accuracy
                if value is not None and (ratio := _ratio(report)) is not None:
                    points.append((ratio, 100 * value))
            points.sort()
            if points:
                ax.plot(*zip(*points, strict=True), marker=marker, color=color, label=policy)
        base_row = first.row(task, length)
        if not isinstance(base_row, ContinuationRow):
            base = base_row.baseline.accuracy or 0.0
            ax.axhline(100 * base, color="black", linestyle="--", linewidth=1, label="uncompressed")
            ax.set_ylabel("accuracy (%)")
        else:
            ax.axhline(0, color="black", linestyle="--", linewidth=1, label="uncompressed")
            ax.set_ylabel("NLL increase (%)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV bytes / the bf16 cache's")
        ax.set_title(f"{task}@{length}")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.suptitle(title)
    save_png(fig, path)


def save_png(fig, path: Path) -> None:
    """The figure as a PNG at ``path``, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    tmp.replace(path)


def replace_section(section: str, body: str, path: Path = Path("docs/BENCHMARKS.md")) -> None:
    """``body`` (starting with its ``section`` heading) in place of that section of ``path``
    (up to the next heading of any level), or appended; written atomically."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"{re.escape(section)}\n.*?(?=\n#+ |\Z)", re.S)
    text = pattern.sub(body.rstrip("\n") + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_docs(markdown: str, args: argparse.Namespace, seconds: float) -> None:
    section = f"{SECTION}: {args.genre} text"
    fit = "proxy fit" if args.proxy else "measured choice on held-out calibration prompts"
    body = (
        f"{section}\n\nSmolLM2-135M-Instruct, plans refitted from `{args.profile}` at each budget "
        f"(fraction of the source model's KV cache at {args.at_context} tokens; profiled: {fit}); "
        f"{args.samples} cases per task and length on {args.genre} text, seed {args.seed}; accuracy with 95% "
        f"Wilson intervals; continuation: NLL increase and KL against the uncompressed model, greedy "
        f"agreement over {args.agreement_tokens} tokens. 2 shared CPU cores, {seconds / 60:.0f} min. Plot: "
        f"`docs/policies-{args.genre}.png`. Reproduce: `python bench/policies.py --samples {args.samples} "
        f"--genre {args.genre} --agreement-tokens {args.agreement_tokens} --write-docs`."
        f"\n\n{markdown}\n"
    )
    replace_section(section, body)  # the section may sit under a "##" of its own


def merged(paths: list[Path]) -> tuple[dict[str, Report], dict[str, int], dict[str, tuple[str, float]], float]:
    """Reports of several runs, ordered by budget then policy; a system's task rows from every
    run that has it (cases depend only on seed, genre, task, length and samples)."""
    runs = [load_runs(path) for path in paths]
    reports: dict[str, Report] = {}
    full_heads: dict[str, int] = {}
    storage: dict[str, tuple[str, float]] = {}
    for run, heads, stored in runs:
        full_heads.update(heads)
        storage.update(stored)
        for name, report in run.items():
            if name in reports:
                reports[name] = replace(reports[name], rows=reports[name].rows + report.rows)
            else:
                reports[name] = report
    settings = [r.settings or EvalSettings() for r in reports.values()]
    samples: dict[str, int] = {}  # per task: runs of other tasks may say nothing of it
    same_samples = all(samples.setdefault(task, n) == n for s in settings for task, n in (s.samples or {}).items())
    if (len({(s.lengths, s.genre) for s in settings}) != 1 or not same_samples
            or len({r.seed for r in reports.values()}) != 1):
        raise SystemExit("--from-json: runs differ in seed, genre, lengths or samples per task")
    task_order = {"passkey": 0, "multikey": 1, "continuation": 2}
    for name, report in reports.items():
        rows = sorted(report.rows, key=lambda row: (task_order.get(row.task, 9), row.length))
        reports[name] = replace(report, rows=tuple(rows))
    order = {policy: i for i, policy in enumerate(POLICY_STYLE)}
    names = sorted(reports, key=lambda n: (-float(n.split(":")[0]), order.get(n.split(":")[1], 9)))
    seconds = sum(next(iter(run.values())).wall_time_s or 0.0 for run, _, _ in runs)
    return {name: reports[name] for name in names}, full_heads, storage, seconds


def refitted(profile: Profile, loaded, args: argparse.Namespace, budget: float, policy: str) -> Profile:
    """``profile`` refitted at ``budget`` for ``policy`` (kept in --refits, reused when there)."""
    name = f"{budget:.4g}-{policy}{'-proxy' if args.proxy else ''}"
    kept = args.refits / f"{name}.yaml" if args.refits else None
    if kept is not None and kept.is_file():
        return load_profile(kept)
    request = replace(request_from_profile(profile, budget, args.at_context), policy=policy)
    measured = policy == PROFILED and not args.proxy
    refit = refit_profile(profile, request, loaded if measured else None)
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        save_profile(refit, kept)
    return refit


def main() -> None:
    args = parse_args()
    if args.from_json:
        reports, full_heads, storage, seconds = merged(args.from_json)
        markdown = table(reports, list(reports), args.at_context, full_heads, storage)
        print(markdown)
        if args.write_docs:
            write_docs(markdown, args, seconds)
            plot(reports, list(reports), Path(f"docs/policies-{args.genre}.png"),
                 f"SmolLM2-135M, {args.genre} text, {args.samples} cases per task, seed {args.seed}")
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded = load_model(args.model)
    profile = load_profile(args.profile)
    plans: dict[str, Plan] = {}
    chosen: dict[str, str] = {}
    refits: dict[tuple[float, str], Profile] = {}  # profiled-fp comes from the profiled refit
    for budget in [float(b) for b in args.budgets.split(",")]:
        for policy in args.policies.split(","):
            name = f"{budget:.4g}:{policy}"
            if policy == QUANTIZED:
                plan, what = quantization_alone(loaded.arch, budget, args.at_context,
                                                profile.settings.bytes_per_value)
                print(f"[{time.perf_counter() - started:7.0f} s] {name}: {what}", flush=True)
                if plan is not None:
                    plans[name] = plan
                continue
            key = (budget, PROFILED if policy == FULL_PRECISION else policy)
            if key not in refits:
                refits[key] = refitted(profile, loaded, args, *key)
            refit = refits[key]
            if policy == FULL_PRECISION:
                plans[name] = full_precision_plan(profile, refit, loaded.arch)
            else:
                plans[name] = refit.plan
                if refit.choice is not None:
                    chosen[name] = refit.choice["chosen"]
                    print(f"[{time.perf_counter() - started:7.0f} s] {name}: chose {chosen[name]}", flush=True)
    full_heads = {name: plan.n_full for name, plan in plans.items()}
    storage = {name: storage_of(plan, args.at_context, loaded.arch.head_dim) for name, plan in plans.items()}
    if args.plans_only:
        return
    model = loaded.build()
    engine = Engine(model, next(iter(plans.values())), loaded.tokenizer)
    config = EvalConfig(tasks=tuple(args.tasks.split(",")), lengths=tuple(int(x) for x in args.lengths.split(",")),
                        samples=args.samples, seed=args.seed, genre=args.genre,
                        agreement_tokens=args.agreement_tokens)

    def progress(done: int, total: int, label: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f} s] {done}/{total} {label}", flush=True)

    # a plan two policies share (profiled-fp where the choice kept full precision) runs once
    first_of: dict[Plan, str] = {}
    for name, plan in plans.items():
        first_of.setdefault(plan, name)
    served = {name: plan.to_served(permuted_by=None) for name, plan in plans.items()  # source weights
              if first_of[plan] == name}
    evaluated = evaluate_systems(engine, served, config, progress=progress)
    reports = {name: evaluated[first_of[plan]] for name, plan in plans.items()}
    seconds = time.perf_counter() - started
    markdown = table(reports, list(plans), args.at_context, full_heads, storage)
    print(markdown)
    if args.json:
        args.json.write_text(dump_runs(reports, full_heads, chosen, storage))
    if args.write_docs:
        write_docs(markdown, args, seconds)
        plot(reports, list(plans), Path(f"docs/policies-{args.genre}.png"),
             f"SmolLM2-135M, {args.genre} text, {args.samples} cases per task, seed {args.seed}")


if __name__ == "__main__":
    main()
