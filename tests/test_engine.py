"""The generation engine on tiny models: sliding layers, long decodes, sampling, limits."""
from __future__ import annotations

import pytest
import torch

from kvcompile.build.artifact import compile_engine
from kvcompile.errors import ContextLengthError
from kvcompile.plan import BudgetLayout, LayerPlan, Plan, Selection
from kvcompile.runtime.engine import sample
from tests.tiny import tiny_hf_model, tiny_loaded


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 90, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["gemma3_text", "mistral"])
def test_sliding_layers_keep_the_model_window(family: str) -> None:
    """Prompt and decode past the sliding window: the runtime equals transformers' model."""
    hf = tiny_hf_model(family, seed=4, sliding_window=8)
    loaded = tiny_loaded(family, seed=4, sliding_window=8)
    arch = loaded.arch
    assert any(arch.sliding_windows)
    plan = Plan.uncompressed(arch.n_layers, arch.n_kv_heads, arch.sliding_windows)
    _, engine = compile_engine(loaded, plan, max_context=64)
    ids = _ids(30)
    cache = engine.allocate(1, max_context=40)
    logits = [engine.prefill(ids[:, :20], [cache])[0]]
    logits += [engine.extend(ids[:, t:t + 1], cache)[0] for t in range(20, 30)]
    with torch.no_grad():
        reference = hf(ids).logits[0, 19:30]
    torch.testing.assert_close(torch.stack(logits), reference, atol=1e-4, rtol=1e-4)
    # the sliding layers' buffers hold the window only
    sliding = [layer for layer, w in zip(cache.layers, arch.sliding_windows, strict=True) if w]
    assert all(layer.budgeted.k.shape[2] == 8 and layer.full is None for layer in sliding)


def test_five_thousand_tokens_past_capacity_keep_memory_constant() -> None:
    loaded = tiny_loaded("llama", seed=5, max_position_embeddings=8192)
    arch = loaded.arch
    layout = BudgetLayout(4, 1, 4, 16)
    plan = Plan(tuple(LayerPlan((), tuple(range(arch.n_kv_heads)), layout) for _ in range(arch.n_layers)))
    _, engine = compile_engine(loaded, plan, max_context=6000)
    cache = engine.allocate(1, max_context=6000)
    before = cache.nbytes
    pointers = [(layer.budgeted.k.data_ptr(), layer.budgeted.v.data_ptr()) for layer in cache.layers]
    # by hand: per layer, every head's 25 slots of float32 keys and values with a float32 bias,
    # and four int64 counters; nothing grows with the 6000 tokens of context
    per_layer = arch.n_kv_heads * layout.capacity * (2 * arch.head_dim * 4 + 4) + 4 * 8
    assert before == arch.n_layers * per_layer
    logits = engine.prefill(_ids(40), [cache])
    token = torch.tensor([[int(logits[0].argmax())]])
    for _ in range(5000):
        logits = engine.extend(token, cache)
        assert torch.isfinite(logits).all()
        token = torch.tensor([[int(logits[0].argmax())]])
    assert cache.length == 5040
    assert cache.nbytes == before
    assert [(layer.budgeted.k.data_ptr(), layer.budgeted.v.data_ptr()) for layer in cache.layers] == pointers
    counters = cache.layers[0].budgeted.counters[0].tolist()
    assert counters[3] == 5040 - 4 - 4 - 16  # everything but sinks, selected and window is folded


def test_context_limit_is_a_clear_error() -> None:
    loaded = tiny_loaded("llama", seed=6)
    arch = loaded.arch
    _, engine = compile_engine(loaded, Plan.uncompressed(arch.n_layers, arch.n_kv_heads), max_context=32)
    with pytest.raises(ContextLengthError, match="more than the context of 32"):
        engine.prefill(_ids(33), [engine.allocate(1)])
    cache = engine.allocate(1)
    engine.prefill(_ids(32), [cache])
    with pytest.raises(ContextLengthError, match="exceed the context"):
        engine.extend(_ids(1), cache)
    with pytest.raises(ContextLengthError, match="exceed the context"):
        engine.generate(list(range(3, 30)), max_new_tokens=8)


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    drawn = {sample(logits, 1.0, 0.6, generator) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 covers 0.6; tokens 2 and 3 are outside the nucleus
    assert sample(logits, 0.0, 1.0, generator) == 0
    wide = {sample(logits, 1.0, 1.0, generator) for _ in range(600)}
    assert wide == {0, 1, 2, 3}


def test_batch_of_two_equals_two_single_runs() -> None:
    loaded = tiny_loaded("qwen2", seed=7)
    arch = loaded.arch
    layout = BudgetLayout(2, 1, 2, 6)
    plan = Plan(tuple(LayerPlan((0,), tuple(range(1, arch.n_kv_heads)), layout) for _ in range(arch.n_layers)),
                selection=Selection("key_norm"))
    _, engine = compile_engine(loaded, plan, max_context=64)
    ids = torch.cat([_ids(24, 1), _ids(24, 2)])
    batch = engine.allocate(2, max_context=40)
    singles = [engine.allocate(1, max_context=40) for _ in range(2)]
    out_batch = [engine.prefill(ids[:, :16], [batch])]
    out_single = [torch.cat([engine.prefill(ids[i:i + 1, :16], [singles[i]]) for i in range(2)])]
    for t in range(16, 24):
        out_batch.append(engine.extend(ids[:, t:t + 1], batch))
        out_single.append(torch.cat([engine.extend(ids[i:i + 1, t:t + 1], singles[i]) for i in range(2)]))
    torch.testing.assert_close(torch.stack(out_batch), torch.stack(out_single), atol=1e-5, rtol=1e-5)


def test_one_prefill_compresses_each_cache_with_its_own_selection_rule() -> None:
    """Several caches share one exact prefill (eval, policies bench); each keeps what it would alone."""
    loaded = tiny_loaded("llama", seed=6)
    arch = loaded.arch
    layout = BudgetLayout(2, 1, 6, 4)
    layers = tuple(LayerPlan((), tuple(range(arch.n_kv_heads)), layout) for _ in range(arch.n_layers))
    by_norm, by_attention = Plan(layers, selection=Selection("key_norm")), Plan(layers, selection=Selection("attention"))
    _, engine = compile_engine(loaded, by_attention, max_context=64)
    ids = _ids(40, seed=1)
    shared = [engine.allocate(1, plan=by_norm), engine.allocate(1, plan=by_attention)]
    engine.prefill(ids, shared)
    for plan, cache in zip((by_norm, by_attention), shared, strict=True):
        alone = engine.allocate(1, plan=plan)
        engine.prefill(ids, [alone])
        for mine, theirs in zip(cache.layers, alone.layers, strict=True):
            torch.testing.assert_close(mine.budgeted.k, theirs.budgeted.k)
    # the two rules really keep different tokens here, so the check above can tell them apart
    assert not torch.equal(shared[0].layers[0].budgeted.k, shared[1].layers[0].budgeted.k)


def test_session_cache_for_cuda_graphs_grows_by_powers_of_two_and_is_reused() -> None:
    """With CUDA graphs a request reuses one cache (its captured step) when it fits, and a
    short request does not reserve the model's whole context (checked on CPU: the policy,
    not the capture)."""
    loaded = tiny_loaded("llama", seed=5, max_position_embeddings=8192)
    _, engine = compile_engine(loaded, Plan.uncompressed(loaded.arch.n_layers, loaded.arch.n_kv_heads),
                               max_context=300)
    engine.cuda_graphs = True
    first = engine.session_cache(1, 10)
    assert first.max_context == 16
    engine.prefill(_ids(5), [first])
    again = engine.session_cache(1, 16)
    assert again is first and again.length == 0  # reused, reset
    grown = engine.session_cache(1, 17)
    assert grown is not first and grown.max_context == 32
    assert engine.session_cache(1, 290).max_context == 300  # capped at the engine's context
    assert engine.session_cache(2, 4).batch == 2
