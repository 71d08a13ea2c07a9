"""The one memory definition against the caches transformers itself allocates.

Reference: transformers' ``StaticCache`` (sliding layers: ``min(window, max_cache_len)``
tokens), measured by running the tiny model into it; the runtime's buffers and the fit's
budget must agree with it.
"""
from __future__ import annotations

import re

import pytest
import torch

from kvcompile.arch import arch_from_config
from kvcompile.errors import BudgetError
from kvcompile.fit.greedy import fit, smallest_budget
from kvcompile.memory import kv_ratio, memory_table, plan_bytes, uncompressed_bytes
from kvcompile.plan import Plan
from kvcompile.runtime.cache import StaticKVCache
from kvcompile.settings import FitSettings
from tests.tiny import tiny_hf_model

SLIDING = {"gemma3_text": dict(sliding_window=24), "mistral": dict(sliding_window=24)}


def _hf_cache_bytes(model, cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _static_cache_bytes(model, context: int) -> int:
    """Bytes of transformers' StaticCache for ``context`` tokens (allocated on the first forward)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=context)
    with torch.no_grad():
        model(torch.tensor([[3, 4]]), cache=cache, use_cache=True)
    return _hf_cache_bytes(model, cache)


@pytest.mark.parametrize("family", ["gemma3_text", "mistral", "llama"])
@pytest.mark.parametrize("context", [8, 24, 100])
def test_uncompressed_bytes_equal_transformers_static_cache(family: str, context: int) -> None:
    model = tiny_hf_model(family, **SLIDING.get(family, {}))
    arch = arch_from_config(model.config)
    assert uncompressed_bytes(arch, context, 4) == _static_cache_bytes(model, context)


@pytest.mark.parametrize("family", ["gemma3_text", "mistral"])
def test_dynamic_sliding_layers_keep_one_token_less_between_steps(family: str) -> None:
    """The documented difference: DynamicCache keeps ``window - 1`` tokens per sliding layer."""
    from transformers import DynamicCache

    model = tiny_hf_model(family, **SLIDING.get(family, {}))
    arch = arch_from_config(model.config)
    context = 100
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(3, 90, (1, context)), cache=cache, use_cache=True)
    sliding_layers = sum(1 for w in arch.sliding_windows if w)
    per_token = arch.n_kv_heads * 2 * arch.head_dim * 4
    assert _hf_cache_bytes(model, cache) == uncompressed_bytes(arch, context, 4) - sliding_layers * per_token


@pytest.mark.parametrize("family", ["gemma3_text", "mistral", "llama"])
@pytest.mark.parametrize("context", [8, 24, 100])
def test_runtime_buffers_of_the_uncompressed_plan_equal_transformers(family: str, context: int) -> None:
    model = tiny_hf_model(family, **SLIDING.get(family, {}))
    arch = arch_from_config(model.config)
    plan = Plan.uncompressed(arch.n_layers, arch.n_kv_heads, arch.sliding_windows)
    cache = StaticKVCache.allocate(plan, 1, context, arch.head_dim, arch.group_size)
    assert cache.nbytes == _static_cache_bytes(model, context) == plan_bytes(plan, arch, context, 4)
    assert kv_ratio(plan, arch, context) == 1.0


def test_fitted_gemma_plan_counts_sliding_layers_at_their_window() -> None:
    """At 256 tokens the sliding layers hold 24: the budget is a share of that cache."""
    arch = arch_from_config(tiny_hf_model("gemma3_text", **SLIDING["gemma3_text"]).config)
    context = 256
    for policy in ("uniform", "pyramid"):
        result = fit(None, arch, FitSettings(kv_budget=0.5, at_context=context, policy=policy, min_window=4))
        cache = StaticKVCache.allocate(result.plan, 1, context, arch.head_dim, arch.group_size)
        reference = 2 * 4 * 24 + 2 * 4 * 256  # two sliding layers at their window, two full layers
        assert cache.nbytes == plan_bytes(result.plan, arch, context, 4)
        assert cache.nbytes / (reference * 2 * arch.head_dim * 4) == pytest.approx(kv_ratio(result.plan, arch, context))
        assert 0.45 < kv_ratio(result.plan, arch, context) <= 0.5
        rows = {row["context"]: row for row in memory_table(result.plan, arch, 4, extra=(context,))}
        assert rows[context]["uncompressed_bytes"] == reference * 2 * arch.head_dim * 4


@pytest.mark.parametrize("policy", ["profiled", "uniform"])
def test_budget_below_the_sliding_layers_names_the_smallest_feasible(policy: str) -> None:
    from kvcompile.profile.statistics import HeadStatistics

    arch = arch_from_config(tiny_hf_model("gemma3_text", **SLIDING["gemma3_text"]).config)
    shape = (arch.n_layers, arch.n_kv_heads)
    stats = HeadStatistics((16, 32), *(torch.rand(shape) for _ in range(6)), error=torch.zeros((*shape, 2)))
    context = 256
    with pytest.raises(BudgetError) as caught:
        fit(stats, arch, FitSettings(kv_budget=0.05, at_context=context, policy=policy))
    message = str(caught.value)
    assert "\n" not in message
    smallest = float(re.search(r"smallest feasible budget at 256 tokens is ([0-9.]+)", message).group(1))
    per_head = 5 if policy == "uniform" else 4 + 1 + 16
    assert smallest == smallest_budget(arch, context, per_head)
    # by hand: 2 sliding layers x 4 heads x 24 + 2 x 4 x per_head, over 2 x 4 x (24 + 256)
    assert smallest == pytest.approx((8 * 24 + 8 * per_head) / (8 * 280), abs=1e-4)
    result = fit(stats, arch, FitSettings(kv_budget=smallest, at_context=context, policy=policy))
    assert kv_ratio(result.plan, arch, context) <= smallest
    with pytest.raises(BudgetError):
        fit(stats, arch, FitSettings(kv_budget=smallest - 2e-4, at_context=context, policy=policy))


def test_all_sliding_model_needs_its_whole_window() -> None:
    """Mistral-style: every layer slides, so nothing is left to compress below the windows."""
    arch = arch_from_config(tiny_hf_model("mistral", **SLIDING["mistral"]).config)
    with pytest.raises(BudgetError, match="smallest feasible budget at 256 tokens is 1$"):
        fit(None, arch, FitSettings(kv_budget=0.5, at_context=256, policy="uniform"))
    result = fit(None, arch, FitSettings(kv_budget=1.0, at_context=256, policy="uniform"))
    assert kv_ratio(result.plan, arch, 256) == 1.0
