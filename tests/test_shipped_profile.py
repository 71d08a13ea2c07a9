"""This project's own CI gate, shown to be able to fail.

The shipped SmolLM2 profile is built into an artifact directory (``build_artifact``, what
``kvcompile build`` runs), loaded back from disk (``load_engine``, what ``kvcompile eval``
runs), evaluated against the uncompressed model and gated with ``examples/gates-ci.yaml``.
The same rules must fail on four broken variants of the shipped plan
(``tests.regressions``: uniform windows at the same memory, the plan refitted at
half its budget, the full heads taken from the bottom of the retrieval ranking, the
budgeted heads cut to sinks + 32 tokens). They are derived from the profile at test time
and served on the loaded artifact next to its own plan, so each case is prefilled once for
all six systems. Settings and the measurements behind the thresholds: the rules file's
header and docs/BENCHMARKS.md ("The CI gate").
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvcompile.build.artifact import build_artifact, load_engine
from kvcompile.eval.evaluate import EvalConfig
from kvcompile.gate.checks import evaluate as evaluate_gate
from kvcompile.gate.loader import load_rules
from kvcompile.gate.render import render_table
from kvcompile.profile.record import load_profile
from tests.regressions import ARTIFACT, evaluate_with_regressions

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "profiles" / "smollm2-135m-instruct.yaml"
RULES = ROOT / "examples" / "gates-ci.yaml"
# what the rules file's header says: kvcompile eval ... --lengths 2048
#   --samples passkey=20,continuation=6 --agreement-tokens 16 --seed 0
CI_EVAL = EvalConfig(tasks=("passkey", "continuation"), lengths=(2048,), samples=1,
                     task_samples=(("passkey", 20), ("continuation", 6)), seed=0, agreement_tokens=16)
VARIANTS = ("uniform (same memory)", "refit at 1/32", "lowest-scoring full heads",
            "sinks + 32-token window")

pytestmark = pytest.mark.slow


def test_shipped_profile_matches_the_installed_model(smollm2) -> None:
    profile = load_profile(SHIPPED)
    assert profile.fingerprint == smollm2.fingerprint, "regenerate the profile: `make profiles`"
    for suffix in ("retrieval", "error", "capacity"):
        assert (SHIPPED.parent / f"{SHIPPED.stem}-{suffix}.png").is_file()


@pytest.fixture(scope="module")
def ci(smollm2, tmp_path_factory):
    started = time.perf_counter()
    profile = load_profile(SHIPPED)
    directory = tmp_path_factory.mktemp("ci") / "artifact"
    build_artifact(smollm2, profile, directory, onnx=False)  # the gate serves the torch runtime
    engine = load_engine(directory)
    reports = evaluate_with_regressions(engine, profile, CI_EVAL)
    print(f"\nCI gate eval: {time.perf_counter() - started:.0f} s (build, load, 6 systems)")
    return engine, reports, load_rules(RULES)


def test_ci_gate_passes_the_shipped_artifact(ci) -> None:
    _, reports, rules = ci
    outcome = evaluate_gate(rules, reports[ARTIFACT])  # raises if a rule is underpowered at n
    print(render_table(outcome))
    assert outcome.passed, render_table(outcome)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ci_gate_fails_a_broken_variant(ci, variant: str) -> None:
    _, reports, rules = ci
    outcome = evaluate_gate(rules, reports[variant])
    print(f"\n{variant}\n{render_table(outcome)}")
    assert not outcome.passed
    # it fails on measured regressions, not on a missing row or metric
    assert all(r.value is not None for r in outcome.failures)


def test_ci_gate_memory_is_what_the_loaded_artifact_allocates(ci) -> None:
    """The memory rule reads the state the runtime allocates, values counted in bfloat16;
    check it against docs/DESIGN.md's formula by hand: full-precision keys and values, a
    float32 bias per full-precision budgeted slot, four int64 counters per budgeted group (and
    a selected length when its selected slots are codes), an int64 length per full group;
    codes 8/bits per byte with float16 scale and zero per key group and channel and per value
    token and channel group, and a full-precision ring of one group for quantized full heads."""
    engine, reports, _ = ci
    memory = reports[ARTIFACT].memory
    assert memory is not None and memory.context is not None
    length, arch = memory.context, engine.arch
    d = arch.head_dim
    per_slot = 2 * d * 2  # keys + values, one token, one head, bfloat16
    assert memory.baseline_bytes == arch.n_layers * arch.n_kv_heads * length * per_slot

    def coded(storage, tokens: int, key_groups: int) -> int:  # one head's quantized tokens
        codes = tokens * (d * storage.key_bits // 8 + d * storage.value_bits // 8)
        return codes + key_groups * d * 4 + tokens * (d // storage.group) * 4

    state = 0
    for layer in engine.plan.layers:
        full, budget = layer.full_storage, layer.budget_storage
        if layer.full_heads and full.quantized:
            body = length // full.group * full.group
            ring = min(full.group, length) * per_slot
            state += len(layer.full_heads) * (coded(full, body, body // full.group) + ring) + 8
        elif layer.full_heads:
            state += len(layer.full_heads) * length * per_slot + 8
        if layer.budgeted_heads:
            lay = layer.layout
            if budget.quantized and lay.selected:
                per_head = (lay.capacity - lay.selected) * (per_slot + 4) + coded(
                    budget, lay.selected, -(-lay.selected // budget.group))
                state += len(layer.budgeted_heads) * per_head + 5 * 8
            else:
                state += len(layer.budgeted_heads) * lay.capacity * (per_slot + 4) + 4 * 8
    assert any(layer.full_storage.quantized for layer in engine.plan.layers)  # the case at hand
    assert memory.artifact_bytes == state and memory.baseline_dtype == "bfloat16"
    assert memory.measured == "allocated"
    # beside it, what the float32 runtime really allocated
    assert memory.allocated_bytes == engine.allocate(1, length).nbytes
    assert memory.allocated_dtype == "float32"


def test_ci_gate_through_the_cli(ci, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kvcompile.cli import main
    from kvcompile.eval.report import write_report

    _, reports, _ = ci
    runner = CliRunner()
    good = write_report(reports[ARTIFACT], tmp_path / "artifact").json
    bad = write_report(reports[VARIANTS[0]], tmp_path / "variant").json
    assert runner.invoke(main, ["gate", str(good), "--rules", str(RULES)]).exit_code == 0
    assert runner.invoke(main, ["gate", str(bad), "--rules", str(RULES)]).exit_code == 1
