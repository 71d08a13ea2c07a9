"""This project's own CI gate: the shipped SmolLM2 profile, compiled, evaluated and gated.

A small eval (few samples, short contexts) so it fits CI; the rules in
examples/gates-ci.yaml only catch a broken build or a large regression.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from kvcompile.artifact import compile_engine
from kvcompile.evaluate import EvalConfig, evaluate
from kvcompile.gate import evaluate as evaluate_gate
from kvcompile.gate import load_rules, render_table
from kvcompile.profile_io import load_profile

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "profiles" / "smollm2-135m-instruct.yaml"

pytestmark = pytest.mark.slow


def test_shipped_profile_matches_the_installed_model(smollm2) -> None:
    profile = load_profile(SHIPPED)
    assert profile.fingerprint == smollm2.fingerprint, "regenerate the profile: `make profiles`"
    for suffix in ("retrieval", "error", "capacity"):
        assert (SHIPPED.parent / f"{SHIPPED.stem}-{suffix}.png").is_file()


def test_ci_gate_on_the_shipped_profile(smollm2) -> None:
    profile = load_profile(SHIPPED)
    _, engine = compile_engine(smollm2, profile.plan, max_context=2048)
    config = EvalConfig(tasks=("passkey", "multikey", "continuation"), lengths=(1536,), samples=4, seed=0,
                        agreement_tokens=16)
    report = evaluate(engine, config)
    outcome = evaluate_gate(load_rules(ROOT / "examples" / "gates-ci.yaml"), report)
    print(render_table(outcome))
    assert outcome.passed, render_table(outcome)
