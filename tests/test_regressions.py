"""The broken variants the CI gate must catch, derived from the shipped profile (no model)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvcompile.arch import arch_from_config
from kvcompile.build.artifact import compile_engine
from kvcompile.fit.pipeline import stats_from_profile
from kvcompile.memory import plan_bytes, uncompressed_bytes
from kvcompile.plan import BudgetLayout, LayerPlan, Plan, Selection
from kvcompile.profile.record import load_profile
from kvcompile.runtime.engine import Engine
from kvcompile.runtime.head_order import ReorderedCache
from tests.regressions import (
    STARVED_WINDOW,
    broken_variants,
    equal_memory_uniform,
    lowest_scoring_full,
    refit,
    refit_request,
    starved_windows,
)
from tests.tiny import tiny_loaded

SHIPPED = Path(__file__).resolve().parents[1] / "profiles" / "smollm2-135m-instruct.yaml"


@pytest.fixture(scope="module")
def shipped():
    from transformers import LlamaConfig

    profile = load_profile(SHIPPED)
    a = profile.model["architecture"]
    config = LlamaConfig(num_hidden_layers=a["layers"], num_attention_heads=a["query_heads"],
                         num_key_value_heads=a["kv_heads"], hidden_size=a["query_heads"] * a["head_dim"],
                         max_position_embeddings=a["max_context"], intermediate_size=64, vocab_size=64)
    return profile, arch_from_config(config)


def test_refit_with_the_recorded_settings_reproduces_the_shipped_plan(shipped) -> None:
    """Guards refit_request: every fit setting the profile records is read back."""
    profile, arch = shipped
    assert refit(profile, arch) == profile.plan


@pytest.mark.parametrize("context", [1536, 2048, 4096])
def test_uniform_has_the_shipped_memory_at_the_eval_context(shipped, context: int) -> None:
    profile, arch = shipped
    plan = equal_memory_uniform(profile.plan, arch, context)
    assert plan.n_full == 0 and plan.policy == "uniform"
    # at most the shipped plan's bytes, and within one slot per head of them (a bf16 slot of a
    # budgeted head: key, value and its float32 bias)
    target = plan_bytes(profile.plan, arch, context)
    per_slot = 2 * arch.head_dim * 2 + 4
    assert target - arch.n_kv_total * per_slot < plan_bytes(plan, arch, context) <= target


def test_refit_at_half_the_budget(shipped) -> None:
    profile, arch = shipped
    plan = refit(profile, arch, kv_budget=profile.settings.kv_budget / 2)
    at = profile.settings.at_context
    target = uncompressed_bytes(arch, at) * profile.settings.kv_budget / 2  # bf16 bytes
    assert 0.95 * target < plan_bytes(plan, arch, at) <= target
    assert plan.n_full <= profile.plan.n_full  # (the shipped settings may fix the count)


def test_lowest_scoring_full_heads(shipped) -> None:
    profile, arch = shipped
    plan = lowest_scoring_full(profile, arch)
    stats = stats_from_profile(profile)  # the ranking the shipped settings use
    scores = stats.needle if refit_request(profile).full_rank == "needle" else stats.retrieval
    full = {(i, h) for i, layer in enumerate(plan.layers) for h in layer.full_heads}
    ranked = sorted((float(scores[i, h]), (i, h)) for i in range(arch.n_layers)
                     for h in range(arch.n_kv_heads))
    assert full == {lh for _, lh in ranked[: profile.plan.n_full]}
    shipped_full = {(i, h) for i, layer in enumerate(profile.plan.layers) for h in layer.full_heads}
    assert not full & shipped_full


def test_starved_windows_keep_the_full_heads(shipped) -> None:
    profile, _ = shipped
    plan = starved_windows(profile.plan)
    for mine, theirs in zip(plan.layers, profile.plan.layers, strict=True):
        assert mine.full_heads == theirs.full_heads and mine.budgeted_heads == theirs.budgeted_heads
        if mine.layout is not None:
            assert mine.layout == BudgetLayout(theirs.layout.sinks, 0, 0, STARVED_WINDOW)


def test_the_four_variants_are_distinct(shipped) -> None:
    profile, arch = shipped
    plans = broken_variants(profile, arch, 2048)
    assert len(plans) == 4 and len({p.layers for p in plans.values()} | {profile.plan.layers}) == 5


def test_a_variant_served_on_an_artifact_computes_what_it_computes_on_the_source() -> None:
    """Plan.to_served: a plan rewritten for weights permuted by another plan."""
    loaded = tiny_loaded("llama", seed=4)
    arch = loaded.arch
    served = Plan((LayerPlan((2,), (0, 1, 3), BudgetLayout(1, 1, 2, 4)),
                   LayerPlan((1, 3), (0, 2), BudgetLayout(1, 0, 2, 3))), selection=Selection("key_norm"))
    variant = Plan((LayerPlan((0, 3), (1, 2), BudgetLayout(2, 0, 1, 3)),
                    LayerPlan((), (0, 1, 2, 3), BudgetLayout(1, 1, 1, 4))), selection=Selection("key_norm"))
    _, artifact = compile_engine(loaded, served)
    source = Engine(loaded.build(), variant, tokenizer=None, eos_token_ids=(0,))
    ids = torch.randint(1, 90, (1, 36), generator=torch.Generator().manual_seed(1))
    rewritten = variant.to_served(permuted_by=served)
    on_artifact = ReorderedCache(artifact.allocate(1, 64, plan=rewritten), rewritten, arch.group_size)
    on_source = ReorderedCache(source.allocate(1, 64), variant.to_served(permuted_by=None),
                               arch.group_size)
    torch.testing.assert_close(artifact.prefill(ids[:, :28], [on_artifact]),
                               source.prefill(ids[:, :28], [on_source]), atol=1e-5, rtol=1e-5)
    for t in range(28, 36):
        torch.testing.assert_close(artifact.extend(ids[:, t:t + 1], on_artifact),
                                   source.extend(ids[:, t:t + 1], on_source), atol=1e-5, rtol=1e-5)
    # served as if the artifact's weights were the source's, the variant's head indices point
    # at the wrong heads (the exact prefill cannot tell; the compressed decode steps can); in
    # source order it is refused outright
    with pytest.raises(ValueError, match="ReorderedCache needs a plan in served order"):
        ReorderedCache(artifact.allocate(1, 64, plan=variant), variant, arch.group_size)
    unpermuted = variant.to_served(permuted_by=None)
    wrong = ReorderedCache(artifact.allocate(1, 64, plan=unpermuted), unpermuted, arch.group_size)
    fresh = ReorderedCache(source.allocate(1, 64), unpermuted, arch.group_size)
    artifact.prefill(ids[:, :28], [wrong])
    source.prefill(ids[:, :28], [fresh])
    gap = max(float((artifact.extend(ids[:, t:t + 1], wrong) - source.extend(ids[:, t:t + 1], fresh))
                    .abs().max()) for t in range(28, 36))
    assert gap > 1e-3


def test_uniform_variant_on_sliding_layers_has_the_plans_memory() -> None:
    """Memory is counted against the model's own cache (sliding layers at their window), so
    the variant gets the plan's slots, not a share of an all-full cache the model never has."""
    from kvcompile.fit.greedy import fit
    from kvcompile.memory import plan_memory_ratio
    from kvcompile.settings import FitSettings
    from tests.tiny import tiny_hf_model

    arch = arch_from_config(tiny_hf_model("gemma3_text", sliding_window=24).config)
    context = 256
    plan = fit(None, arch, FitSettings(kv_budget=0.6, at_context=context, policy="pyramid",
                                      min_window=4)).plan
    variant = equal_memory_uniform(plan, arch, context)
    assert variant.policy == "uniform"
    target = plan.kv_slots(context)
    assert target - arch.n_kv_total < variant.kv_slots(context) <= target
    assert plan_memory_ratio(variant, arch, context) == pytest.approx(
        plan_memory_ratio(plan, arch, context), abs=0.02)
