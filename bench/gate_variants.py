"""Score the shipped artifact and its broken variants, and gate each with a rules file.

Builds the artifact from the profile (or takes --artifact DIR), loads it from disk, derives
the broken variants of ``tests.regressions`` from the profile, evaluates all of them in
one shared run per task and prints one Markdown table row per system, then the gate's
verdict on each with the rules' detectable regressions. What tests/test_shipped_profile.py
runs in CI, with any lengths, sample sizes and seed.

    python bench/gate_variants.py --lengths 2048 --samples passkey=20,continuation=6 \\
        --rules examples/gates-ci.yaml --seed 0
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# tests.regressions is test support, outside the package: import it from this checkout
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kvcompile.build.artifact import build_artifact, load_engine  # noqa: E402
from kvcompile.eval.evaluate import EvalConfig  # noqa: E402
from kvcompile.eval.report import ContinuationRow, Interval, Report, report_to_dict  # noqa: E402
from kvcompile.gate.checks import evaluate as evaluate_gate  # noqa: E402
from kvcompile.gate.loader import load_rules  # noqa: E402
from kvcompile.gate.render import render_table  # noqa: E402
from kvcompile.models import load_model  # noqa: E402
from kvcompile.profile.record import load_profile  # noqa: E402
from tests.regressions import evaluate_with_regressions  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--profile", type=Path,
                        default=Path("profiles/smollm2-135m-instruct.yaml"))
    parser.add_argument("--artifact", type=Path, default=None,
                        help="a built artifact of --profile (default: build one in a temp dir)")
    parser.add_argument("--lengths", default="2048")
    parser.add_argument("--samples", default="passkey=20,continuation=6",
                        help="cases per task: N for every task, or task=N pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--agreement-tokens", type=int, default=16)
    parser.add_argument("--rules", type=Path, default=None, help="gate every system with these rules")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the reports here")
    return parser.parse_args()


def parse_samples(text: str) -> tuple[int, tuple[tuple[str, int], ...]]:
    default, pairs = 10, []
    for part in text.split(","):
        name, _, count = part.rpartition("=")
        if name:
            pairs.append((name, int(count)))
        else:
            default = int(count)
    return default, tuple(pairs)


def _ci(values: Interval | None, scale: float = 100.0, digits: int = 0) -> str:
    if not values:
        return ""
    return f" [{scale * values[0]:.{digits}f}, {scale * values[1]:.{digits}f}]"


def _num(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(scale * value, spec)


def table(reports: dict[str, Report]) -> str:
    header = ["system", "KV memory"]
    first = next(iter(reports.values()))
    for row in first.rows:
        label = f"{row.label} (n={row.n})"
        header += [f"{label} NLL Δ", "KL", "agreement"] if isinstance(row, ContinuationRow) else [label]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = ["uncompressed", "1.000"]
    for row in first.rows:
        base += ["—", "—", "—"] if isinstance(row, ContinuationRow) else [
            f"{row.baseline.correct}/{row.n}" + _ci(row.baseline.ci95)]
    lines.append("| " + " | ".join(base) + " |")
    for name, report in reports.items():
        cells = [name, _num(report.memory.ratio if report.memory else None, ".3f")]
        for row in report.rows:
            if isinstance(row, ContinuationRow):
                cells += [_num(row.nll_increase, "+.2f", 100) + "%" + _ci(row.nll_increase_ci95, digits=2),
                          _num(row.kl, ".3f") + _ci(row.kl_ci95, 1, 3),
                          _num(row.agreement, ".0f", 100) + "%" + _ci(row.agreement_ci95)]
            else:
                cells.append(f"{row.artifact.correct}/{row.n}" + _ci(row.artifact.ci95))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    default_n, per_task = parse_samples(args.samples)
    tasks = tuple(task for task, _ in per_task) or ("passkey", "multikey", "continuation")
    started = time.perf_counter()
    profile = load_profile(args.profile)
    with tempfile.TemporaryDirectory(prefix="kvcompile-gate-") as tmp:
        artifact = args.artifact
        if artifact is None:
            artifact = Path(tmp) / "artifact"
            build_artifact(load_model(args.model), profile, artifact)
        engine = load_engine(artifact)
        built = time.perf_counter() - started
        config = EvalConfig(tasks=tasks, lengths=tuple(int(x) for x in args.lengths.split(",")),
                            samples=default_n, task_samples=per_task, seed=args.seed,
                            agreement_tokens=args.agreement_tokens)

        def progress(done: int, total: int, label: str) -> None:
            print(f"[{time.perf_counter() - started:6.0f} s] {done}/{total} {label}", flush=True)

        reports = evaluate_with_regressions(engine, profile, config, progress=progress)
    seconds = time.perf_counter() - started
    print(f"\nseed {args.seed}; build + load {built:.0f} s, total {seconds:.0f} s\n")
    print(table(reports))
    if args.json:
        args.json.write_text(json.dumps({name: report_to_dict(r) for name, r in reports.items()}, indent=2))
    if args.rules:
        rules = load_rules(args.rules)
        for name, report in reports.items():
            outcome = evaluate_gate(rules, report)
            print(f"\n## {name}: {'PASS' if outcome.passed else 'FAIL'}\n")
            print(render_table(outcome))


if __name__ == "__main__":
    main()
