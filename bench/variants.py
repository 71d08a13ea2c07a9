"""Variants of the profiled plan at one memory target, served side by side on the benchmark.

Each variant is the proxy fit with some fit settings changed (``name=field:value,...``, the names
of ``FitSettings.recorded``: a profile's ``fit.settings``),
or ``name=layers:LO-HI@BUDGET``: the first variant's plan with layers LO..HI given the layouts
of the fit at BUDGET (more memory than the target; same full heads required), which asks where
the budgeted heads' slots matter. Every plan and the uncompressed baseline share one exact
prefill per case (``evaluate_systems``, as bench/policies.py). Prints bench/policies.py's table.
The "Where the 1/8 answers go" tables of docs/BENCHMARKS.md were run with this logic:

    python bench/variants.py --budget 0.125 --genre licenses --tasks multikey --threads 1 \\
        --variant base= --variant quarter=selected_fraction:0.25 \\
        --variant 'late=layers:18-23@0.25' --variant 'needle5=full_heads:5,full_rank:needle'
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # sleeping OpenMP workers (bench/decode.py)

import torch  # noqa: E402
from policies import dump_runs, table  # noqa: E402  (bench/ is the script's directory)

from kvcompile.eval.evaluate import EvalConfig, evaluate_systems  # noqa: E402
from kvcompile.fit.greedy import fit  # noqa: E402
from kvcompile.fit.pipeline import request_from_profile, stats_from_profile  # noqa: E402
from kvcompile.models import load_model  # noqa: E402
from kvcompile.plan import Plan  # noqa: E402
from kvcompile.profile.record import load_profile  # noqa: E402
from kvcompile.runtime.engine import Engine  # noqa: E402
from kvcompile.settings import setting_kinds  # noqa: E402
from kvcompile.textsource import GENRES  # noqa: E402

FIELD_TYPES = setting_kinds()


def parse_settings(text: str) -> dict[str, object]:
    """``field:value,...`` into ``FitSettings.with_values`` keyword arguments, typed by the setting."""
    out: dict[str, object] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition(":")
        if key not in FIELD_TYPES:
            raise SystemExit(f"unknown fit setting {key!r}; one of {', '.join(FIELD_TYPES)}")
        kind = FIELD_TYPES[key]
        out[key] = value if kind is str else float(value) if kind == (int, float) else int(value)
    return out


def with_layers_of(base: Plan, donor: Plan, low: int, high: int) -> Plan:
    """``base`` with layers ``low..high`` (inclusive) taken from ``donor``; full heads must agree."""
    if [layer.full_heads for layer in base.layers] != [layer.full_heads for layer in donor.layers]:
        raise SystemExit("layers:LO-HI@BUDGET needs the fit at BUDGET to keep the same full heads")
    layers = tuple(d if low <= i <= high else b for i, (b, d) in enumerate(zip(base.layers, donor.layers, strict=True)))
    return replace(base, layers=layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--profile", type=Path, default=Path("profiles/smollm2-135m-instruct.yaml"))
    parser.add_argument("--budget", type=float, required=True)
    parser.add_argument("--at-context", type=int, default=4096)
    parser.add_argument("--variant", action="append", required=True, help="NAME=field:value,... or NAME=layers:LO-HI@BUDGET")
    parser.add_argument("--lengths", default="4096")
    parser.add_argument("--tasks", default="passkey,multikey,continuation")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--genre", default="pydoc", choices=sorted(GENRES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw reports here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded = load_model(args.model)
    profile = load_profile(args.profile)
    stats = stats_from_profile(profile)
    # the user's settings recorded in the profile (the proxy fit's), not the measured choice's
    request = request_from_profile(profile, args.budget, args.at_context)
    plans: dict[str, Plan] = {}
    for spec in args.variant:
        name, _, settings = spec.partition("=")
        if settings.startswith("layers:"):
            if not plans:
                raise SystemExit(f"--variant {spec}: a layers variant changes the first variant; give that one first")
            span, _, donor_budget = settings.removeprefix("layers:").partition("@")
            low, _, high = span.partition("-")
            donor = fit(stats, loaded.arch, replace(request, kv_budget=float(donor_budget))).plan
            plan = with_layers_of(next(iter(plans.values())), donor, int(low), int(high))
        else:
            plan = fit(stats, loaded.arch, request.with_values(**parse_settings(settings))).plan
        plans[f"{args.budget:.4g}:{name}"] = plan
    engine = Engine(loaded.build(), next(iter(plans.values())), loaded.tokenizer)
    config = EvalConfig(tasks=tuple(args.tasks.split(",")), lengths=tuple(int(x) for x in args.lengths.split(",")),
                        samples=args.samples, seed=args.seed, genre=args.genre, agreement_tokens=0)
    served = {name: plan.to_served(permuted_by=None) for name, plan in plans.items()}  # source weights
    reports = evaluate_systems(engine, served, config, progress=lambda done, total, label: print(
        f"[{time.perf_counter() - started:7.0f} s] {done}/{total} {label}", flush=True))
    full_heads = {name: plan.n_full for name, plan in plans.items()}
    print(table(reports, list(plans), args.at_context, full_heads))
    if args.json:
        args.json.write_text(dump_runs(reports, full_heads))


if __name__ == "__main__":
    main()
