"""Evaluation protocol, report reproducibility and the gate on real artifacts' engines."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from kvcompile.build.artifact import compile_engine
from kvcompile.eval.evaluate import EvalConfig, evaluate, evaluate_systems
from kvcompile.eval.report import AccuracyRow, ContinuationRow
from kvcompile.gate.checks import evaluate as evaluate_gate
from kvcompile.gate.loader import load_rules
from kvcompile.plan import BudgetLayout, LayerPlan, Plan, Selection
from kvcompile.runtime.engine import Engine
from kvcompile.runtime.head_order import ReorderedCache
from tests.tiny import tiny_loaded


def _mixed_plan(n_layers: int, n_kv: int, layout: BudgetLayout) -> Plan:
    """Layer i keeps KV head (i % n_kv) and the last head full, the others budgeted."""
    layers = []
    for i in range(n_layers):
        full = tuple(sorted({i % n_kv, n_kv - 1}))
        layers.append(LayerPlan(full, tuple(h for h in range(n_kv) if h not in full), layout))
    return Plan(tuple(layers), selection=Selection("key_norm"))


def test_reordering_at_attention_time_equals_permuted_weights() -> None:
    """Serving a plan on unpermuted weights (policies bench) is the artifact's function."""
    loaded = tiny_loaded("llama", seed=3)
    arch = loaded.arch
    plan = _mixed_plan(arch.n_layers, arch.n_kv_heads, BudgetLayout(2, 1, 3, 4))
    _, permuted = compile_engine(loaded, plan)
    plain = Engine(loaded.build(), plan, tokenizer=None, eos_token_ids=(0,))
    ids = torch.randint(1, 90, (1, 40), generator=torch.Generator().manual_seed(0))
    a = permuted.allocate(1, 64)
    b = ReorderedCache(plain.allocate(1, 64), plan.to_served(permuted_by=None), arch.group_size)
    torch.testing.assert_close(permuted.prefill(ids[:, :30], [a]), plain.prefill(ids[:, :30], [b]),
                               atol=1e-5, rtol=1e-5)
    for t in range(30, 40):  # decode past every budgeted head's capacity (2 + 3 + 4 slots)
        step = ids[:, t:t + 1]
        torch.testing.assert_close(permuted.extend(step, a), plain.extend(step, b), atol=1e-5, rtol=1e-5)
    # and it really is compressed: the uncompressed model differs by now
    full = plain.allocate(1, 64, plan=plain.uncompressed_plan())
    plain.prefill(ids[:, :30], [full])
    for t in range(30, 39):
        plain.extend(ids[:, t:t + 1], full)
    assert (plain.extend(ids[:, 39:40], full) - permuted.extend(ids[:, 39:40], a)).abs().max() > 1e-3


def test_eval_config_rejects_bad_input() -> None:
    from kvcompile.errors import KVCompileError

    for kwargs in ({"tasks": ("nope",)}, {"samples": 0}, {"lengths": (16,)}):
        with pytest.raises(KVCompileError):
            EvalConfig(**kwargs)


def test_samples_per_task(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kvcompile.cli import main
    from kvcompile.errors import KVCompileError

    config = EvalConfig(tasks=("passkey", "continuation"), samples=4, task_samples=(("passkey", 20),))
    assert (config.samples_for("passkey"), config.samples_for("continuation")) == (20, 4)
    with pytest.raises(KVCompileError, match="multikey"):
        EvalConfig(tasks=("passkey",), task_samples=(("multikey", 3),))
    with pytest.raises(KVCompileError, match="for passkey"):
        EvalConfig(tasks=("passkey",), task_samples=(("passkey", 0),))
    result = CliRunner().invoke(main, ["eval", str(tmp_path), "--samples", "passkey=x"])
    assert result.exit_code == 2 and "--samples" in result.stderr


# -- real model ---------------------------------------------------------------------------

# at n = 4 a point drop rule of 0.25 catches a drop of 0.6 from any baseline >= 0.5 (power.py)
GATE = """
format: kvcompile-gates/1
rules:
  - {task: passkey, max_drop: 0.25, detect: 0.6}
  - {task: continuation, max_nll_increase: 0.05}
"""


@pytest.fixture(scope="module")
def engines(smollm2):
    arch = smollm2.arch
    uncompressed = Plan.uncompressed(arch.n_layers, arch.n_kv_heads)
    damaged = Plan(tuple(LayerPlan((), tuple(range(arch.n_kv_heads)), BudgetLayout(4, 0, 0, 4))
                         for _ in range(arch.n_layers)), policy="damaged")
    return {name: compile_engine(smollm2, plan, max_context=1024)[1]
            for name, plan in (("uncompressed", uncompressed), ("damaged", damaged))}


CONFIG = EvalConfig(tasks=("passkey", "continuation"), lengths=(320,), samples=4, seed=1, agreement_tokens=8)


@pytest.fixture(scope="module")
def reports(engines):
    return {name: evaluate(engine, CONFIG) for name, engine in engines.items()}


@pytest.mark.slow
def test_gate_passes_uncompressed_and_fails_damaged(reports, tmp_path: Path) -> None:
    rules_path = tmp_path / "gates.yaml"
    rules_path.write_text(GATE)
    rules = load_rules(rules_path)
    passkey, cont = reports["uncompressed"].rows
    assert isinstance(passkey, AccuracyRow) and isinstance(cont, ContinuationRow)
    assert passkey.baseline.accuracy >= 0.5, "the model must solve short passkeys for this test"
    # the all-full artifact is the baseline: same answers, same NLL, zero KL
    assert passkey.artifact == replace(passkey.baseline, wall_time_s=passkey.artifact.wall_time_s)
    assert cont.kl < 1e-6 and cont.agreement == 1.0
    assert evaluate_gate(rules, reports["uncompressed"]).passed
    damaged = evaluate_gate(rules, reports["damaged"])
    assert not damaged.passed
    assert any(not r.passed and r.task == "passkey" for r in damaged.results)
    assert reports["damaged"].memory.ratio < 0.05


@pytest.mark.slow
def test_gate_cli_exit_codes(reports, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kvcompile.cli import main
    from kvcompile.eval.report import write_report

    rules = tmp_path / "gates.yaml"
    rules.write_text(GATE)
    good = write_report(reports["uncompressed"], tmp_path / "good").json
    bad = write_report(reports["damaged"], tmp_path / "bad").json
    runner = CliRunner()
    assert runner.invoke(main, ["gate", str(good), "--rules", str(rules)]).exit_code == 0
    assert runner.invoke(main, ["gate", str(bad), "--rules", str(rules)]).exit_code == 1
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"format": "kvcompile-gates/1", "rules": [{"task": "passkey", "max_drop": "x"}]}))
    result = runner.invoke(main, ["gate", str(good), "--rules", str(broken)])
    assert result.exit_code == 2 and "max_drop" in result.stderr


@pytest.mark.slow
def test_reports_are_reproducible(engines, reports) -> None:
    again = evaluate(engines["damaged"], CONFIG)

    def strip_times(report):
        rows = tuple(replace(row, baseline=replace(row.baseline, wall_time_s=None),
                             artifact=replace(row.artifact, wall_time_s=None)) for row in report.rows)
        return replace(report, wall_time_s=None, rows=rows)

    assert strip_times(again) == strip_times(reports["damaged"])


@pytest.mark.slow
def test_shared_prefill_matches_separate_runs(engines) -> None:
    """Evaluating two plans in one run gives each the same numbers as running it alone."""
    engine = engines["uncompressed"]
    arch = engine.arch
    small = Plan(tuple(LayerPlan((), tuple(range(arch.n_kv_heads)), BudgetLayout(4, 1, 8, 64))
                       for _ in range(arch.n_layers)))
    config = EvalConfig(tasks=("continuation",), lengths=(256,), samples=1, seed=2, agreement_tokens=4)
    small, full = small.to_served(permuted_by=None), engine.plan.to_served(permuted_by=None)
    together = evaluate_systems(engine, {"small": small, "full": full}, config)
    alone = evaluate_systems(engine, {"small": small}, config)
    assert together["small"].rows[0].kl == pytest.approx(alone["small"].rows[0].kl, abs=1e-9)
    assert together["small"].rows[0].kl > 1e-4
    assert together["full"].rows[0].kl < 1e-6
