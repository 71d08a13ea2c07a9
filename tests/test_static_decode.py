"""The decode step as a GPU runs it: device-side state, static shapes, no host reads.

On CPU the runtime reads lengths and counters back to take shortcuts (``ops.CPU_SHORTCUTS``);
with them off, CPU runs the device path. Both must compute the same numbers, every decode step
must have the same shapes and buffers (what a CUDA graph replays), and on a device nothing may
be read back to the host (meta tensors refuse any such read).
"""
from __future__ import annotations

import pytest
import torch

from kvcompile.build.artifact import compile_engine
from kvcompile.plan import BudgetLayout, LayerPlan, Plan
from kvcompile.runtime import cache as cache_module
from kvcompile.runtime import ops
from tests.tiny import tiny_loaded

PROMPT, STEPS, BATCH = 40, 200, 2
LAYOUT = BudgetLayout(2, 1, 3, 8)  # capacity 14: 200 steps go far past it


def _engine(family: str = "llama"):
    loaded = tiny_loaded(family, seed=3, max_position_embeddings=512)
    arch = loaded.arch
    layers = tuple(
        LayerPlan((), tuple(range(arch.n_kv_heads)), BudgetLayout(0, 0, 0, window), sliding=True)
        if window else LayerPlan((0,), tuple(range(1, arch.n_kv_heads)), LAYOUT)
        for window in arch.sliding_windows)
    _, engine = compile_engine(loaded, Plan(layers), max_context=PROMPT + STEPS + 8)
    return engine


def _ids() -> torch.Tensor:
    return torch.randint(3, 90, (BATCH, PROMPT + STEPS), generator=torch.Generator().manual_seed(0))


def _decode(engine, ids: torch.Tensor, max_context: int) -> torch.Tensor:
    """Prefill the prompt, then teacher-force the rest one token per step: logits [S+1, B, V]."""
    cache = engine.allocate(BATCH, max_context=max_context)
    out = [engine.prefill(ids[:, :PROMPT], [cache])]
    out += [engine.extend(ids[:, t:t + 1], cache) for t in range(PROMPT, ids.shape[1])]
    return torch.stack(out)


def test_device_path_equals_cpu_shortcuts_past_capacity(monkeypatch) -> None:
    engine = _engine()
    ids = _ids()
    shortcut = _decode(engine, ids, PROMPT + STEPS)
    monkeypatch.setattr(ops, "CPU_SHORTCUTS", False)
    # a buffer far larger than the tokens: the device path masks by length instead of slicing
    static = _decode(engine, ids, PROMPT + STEPS + 8)
    torch.testing.assert_close(static, shortcut, atol=2e-5, rtol=2e-5)
    # and the plan really compresses here: the uncompressed model answers differently
    full = engine.allocate(BATCH, max_context=PROMPT + STEPS, plan=engine.uncompressed_plan())
    engine.prefill(ids[:, :PROMPT], [full])
    last = [engine.extend(ids[:, t:t + 1], full) for t in range(PROMPT, ids.shape[1])][-1]
    assert (last - shortcut[-1]).abs().max() > 1e-2


def test_every_decode_step_has_the_same_shapes_and_buffers(monkeypatch) -> None:
    monkeypatch.setattr(ops, "CPU_SHORTCUTS", False)
    engine = _engine()
    ids = _ids()
    seen: list[tuple] = []

    def recording(q, k, v, bias=None, **kwargs):
        kv_length = kwargs.get("kv_length")
        seen.append((tuple(q.shape), k.data_ptr(), tuple(k.shape),
                     None if bias is None else bias.data_ptr(),
                     None if kv_length is None else kv_length.data_ptr()))
        return ops.budgeted_attention(q, k, v, bias, **kwargs)

    monkeypatch.setattr(cache_module, "budgeted_attention", recording)
    cache = engine.allocate(BATCH, max_context=PROMPT + STEPS)
    engine.prefill(ids[:, :PROMPT], [cache])
    steps = []
    for t in range(PROMPT, PROMPT + 30):
        seen.clear()
        engine.extend(ids[:, t:t + 1], cache)
        steps.append(list(seen))
    assert all(step == steps[0] for step in steps[1:])
    n_layers = engine.arch.n_layers
    assert len(steps[0]) == 2 * n_layers  # a full and a budgeted group per layer
    assert sum(entry[4] is not None for entry in steps[0]) == n_layers  # full heads: by length
    assert cache.seen.tolist() == [PROMPT + 30] * BATCH
    assert [layer.full.length.tolist() for layer in cache.layers] == [[PROMPT + 30] * BATCH] * n_layers


def test_decode_step_reads_nothing_back_on_a_device() -> None:
    """Run the decode step on the meta device: any .item(), .tolist() or bool() would raise."""
    engine = _engine()
    engine.model.to("meta")
    cache = engine.allocate(BATCH, max_context=64)
    for layer in cache.layers:
        layer.length = 20  # the host-side count (a real prefill would have set it)
    logits = engine.decode_step(torch.zeros(BATCH, 1, dtype=torch.long), cache)
    assert logits.device.type == "meta" and logits.shape == (BATCH, engine.arch.vocab_size)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_bfloat16_stays_close_to_float32(family: str) -> None:
    """Stated tolerance: next-token probabilities within 0.05, greedy tokens agree >= 90%."""
    engine = _engine(family)
    ids = _ids()
    reference = _decode(engine, ids, PROMPT + STEPS).float()
    engine.model.to(torch.bfloat16)
    low = _decode(engine, ids, PROMPT + STEPS)
    assert low.dtype == torch.bfloat16
    cache = engine.allocate(1, max_context=8)
    layer = next(layer for layer in cache.layers if layer.full is not None)
    assert layer.full.k.dtype == torch.bfloat16
    assert layer.budgeted.bias.dtype == torch.float32  # ln n is not rounded to bf16
    probs = (low.float().softmax(-1) - reference.softmax(-1)).abs().max()
    assert probs < 0.05
    assert (low.float().argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
