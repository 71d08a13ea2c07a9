"""Quantized head groups against a reference that keeps the whole token history.

At every step the reference recomputes from scratch which tokens each head holds and in which
form (docs/DESIGN.md, "Quantized storage"): a full head's whole groups of tokens as codes
(dequantized by the float64 oracle of ``tests/test_quant.py``) and the rest exact; a budgeted
head's selected prompt tokens as codes (groups of consecutive selected tokens), its sinks,
window and compensation mean exact, evicted window tokens folded, never selected. Runs go to
three times the budgeted capacity, through ring wraps, residual flushes and compensation.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompile.plan import BudgetLayout, LayerPlan, Selection, Storage
from kvcompile.runtime.cache import LayerKV
from kvcompile.runtime.quant import quantize_keys, quantize_values
from kvcompile.runtime.quant_cache import QuantizedFullBuffer
from kvcompile.runtime.quant_ops import quantized_append
from tests.test_cache import causal_reference, prompt_scores, random_qkv, softmax_attend
from tests.test_quant import oracle

F64 = torch.float64


def dequantized(x: torch.Tensor, storage: Storage) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[n, D]`` of one head as the float64 oracle stores them as codes.

    The cache quantizes float32 values (runtime/quant.py): the oracle starts from the same
    float32 numbers, since a code's argument ``(x - zero) / scale`` divides the float32
    rounding of ``x`` by a scale that may be far smaller than ``x``."""
    arr = x.float().double().numpy()[None, None]
    keys = oracle(arr, storage.key_bits, storage.group, "channel")[0][0, 0]
    values = oracle(arr, storage.value_bits, storage.group, "token")[0][0, 0]
    return torch.from_numpy(keys), torch.from_numpy(values)


def full_head_reference(q, k, v, kv_head, b, g, n_tok, prompt_len, storage, scale, out):
    for p in range(prompt_len, n_tok):
        n = p + 1
        body = (n // storage.group) * storage.group
        keys, values = k[b, kv_head, :n].clone(), v[b, kv_head, :n].clone()
        if body:
            keys[:body], _ = dequantized(k[b, kv_head, :body], storage)
            _, values[:body] = dequantized(v[b, kv_head, :body], storage)
        for i in range(kv_head * g, (kv_head + 1) * g):
            out[b, i, p] = softmax_attend(q[b, i, p], list(keys), list(values), [0.0] * n, scale)


def budget_head_reference(q, k, v, kv_head, b, g, n_tok, prompt_len, layout, storage, scale,
                          selection, obs, out):
    s, c, h, w = layout.sinks, layout.compensation, layout.selected, layout.window
    scores = prompt_scores(q, k, prompt_len, kv_head, b, g, scale, selection, obs)
    middle = list(range(s, max(s, prompt_len - w)))
    selected = sorted(sorted(middle, key=lambda j: (-scores[j], j))[:h])  # prompt only
    if selected:
        sel_k, _ = dequantized(k[b, kv_head, selected], storage)
        _, sel_v = dequantized(v[b, kv_head, selected], storage)
    for p in range(prompt_len, n_tok):
        n = p + 1
        win_start = max(s, n - w)
        exact = list(range(min(n, s))) + list(range(win_start, n))
        keys = [k[b, kv_head, j] for j in exact] + ([*sel_k] if selected else [])
        values = [v[b, kv_head, j] for j in exact] + ([*sel_v] if selected else [])
        extra = [0.0] * len(keys)
        folded = [j for j in range(s, win_start) if j not in selected] if c else []
        if folded:
            keys.append(k[b, kv_head, folded].mean(0))
            values.append(v[b, kv_head, folded].mean(0))
            extra.append(math.log(len(folded)))
        for i in range(kv_head * g, (kv_head + 1) * g):
            out[b, i, p] = softmax_attend(q[b, i, p], keys, values, extra, scale)


storages = st.builds(lambda kv, group: Storage(*kv, group),
                     st.sampled_from([(8, 8), (8, 4), (4, 4), (4, 2), (2, 2)]), st.integers(2, 5))


@settings(max_examples=30, deadline=None)
@given(
    layout=st.builds(BudgetLayout, st.integers(0, 2), st.integers(0, 1), st.integers(1, 6),
                     st.integers(1, 4)),
    full_storage=storages,
    budget_storage=storages,
    g=st.integers(1, 2),
    prompt_len=st.integers(1, 16),
    chunks=st.lists(st.integers(1, 3), min_size=1, max_size=12),
    selection=st.sampled_from(["key_norm", "attention"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantized_layer_matches_history_reference(layout, full_storage, budget_storage, g,
                                                   prompt_len, chunks, selection, seed):
    d, n_full, n_budget, batch, obs = 5, 1, 1, 2, 3
    n_tok = max(prompt_len + sum(chunks), 3 * layout.capacity)
    chunks = chunks + [1] * (n_tok - prompt_len - sum(chunks))
    plan = LayerPlan((0,), (1,), layout, full_storage=full_storage, budget_storage=budget_storage)
    layer = LayerKV.allocate(plan, batch, n_tok, d, g, F64)
    q, k, v = random_qkv(seed, batch, n_full + n_budget, g, n_tok, d)
    scale = 1 / math.sqrt(d)
    outs = [layer.prefill(q[:, :, :prompt_len], k[:, :, :prompt_len], v[:, :, :prompt_len], scale,
                          Selection(selection, obs))]
    pos = prompt_len
    for t in chunks:
        outs.append(layer.extend(q[:, :, pos:pos + t], k[:, :, pos:pos + t], v[:, :, pos:pos + t],
                                 scale))
        pos += t
    got = torch.cat(outs, dim=2)
    want = causal_reference(q[:, :, :prompt_len], k[:, :, :prompt_len], v[:, :, :prompt_len], scale)
    want = torch.cat([want, torch.zeros(batch, q.shape[1], n_tok - prompt_len, d, dtype=F64)], 2)
    for b in range(batch):
        full_head_reference(q, k, v, 0, b, g, n_tok, prompt_len, full_storage, scale, want)
        budget_head_reference(q, k, v, 1, b, g, n_tok, prompt_len, layout, budget_storage, scale,
                              selection, obs, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("storage", [Storage(8, 8, 4), Storage(4, 2, 3)])
def test_rows_at_different_lengths_append_and_flush_independently(storage):
    """Rows of one buffer at different lengths end where each row alone would (bit for bit)."""
    d, heads, max_context = 6, 2, 20
    lengths = [0, 2, 3, 7]
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(len(lengths), heads, max_context, d, 2, generator=gen)

    def fed(rows: list[int], steps: int) -> QuantizedFullBuffer:
        buf = QuantizedFullBuffer.empty(len(rows), heads, max_context, d, storage)
        for r, row in enumerate(rows):  # each row's own history first, one token at a time
            one = buf.rows(r, r + 1)
            for t in range(lengths[row]):
                x = tokens[row:row + 1, :, t:t + 1]
                quantized_append(one.keys, one.values, one.k_res, one.v_res, one.length, x[..., 0],
                                 x[..., 1], key_bits=storage.key_bits,
                                 value_bits=storage.value_bits, group=storage.group)
        for step in range(steps):  # then all rows together, each at its own position
            x = torch.stack([tokens[row, :, lengths[row] + step] for row in rows])[:, :, None]
            quantized_append(buf.keys, buf.values, buf.k_res, buf.v_res, buf.length, x[..., 0],
                             x[..., 1], key_bits=storage.key_bits, value_bits=storage.value_bits,
                             group=storage.group)
        return buf

    together = fed(list(range(len(lengths))), 9)
    for r in range(len(lengths)):
        alone = fed([r], 9)
        mine = together.rows(r, r + 1)
        assert int(mine.length) == lengths[r] + 9
        for a, b in ((mine.keys.codes, alone.keys.codes), (mine.keys.scale, alone.keys.scale),
                     (mine.values.codes, alone.values.codes), (mine.values.zero, alone.values.zero),
                     (mine.k_res, alone.k_res)):
            assert torch.equal(a, b)
    # and the flushed body holds exactly the quantized first whole groups of each row
    for r, n in enumerate(lengths):
        body = ((n + 9) // storage.group) * storage.group
        want = quantize_keys(tokens[r:r + 1, :, :body, :, 0], storage.key_bits, storage.group)
        assert torch.equal(together.keys.codes[r:r + 1, :, :body], want.codes)
        want_v = quantize_values(tokens[r:r + 1, :, :body, :, 1], storage.value_bits, storage.group)
        assert torch.equal(together.values.scale[r:r + 1, :, :body], want_v.scale)


def test_bulk_prompt_fill_equals_token_by_token():
    storage = Storage(4, 4, 4)
    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn(2, 2, 3, 11, 6, generator=gen)
    bulk = QuantizedFullBuffer.empty(2, 3, 16, 6, storage)
    bulk.fill(k, v)
    step = QuantizedFullBuffer.empty(2, 3, 16, 6, storage)
    step.write(k, v)
    assert torch.equal(bulk.length, step.length)
    for a, b in ((bulk.keys.codes, step.keys.codes), (bulk.keys.zero, step.keys.zero),
                 (bulk.values.codes, step.values.codes), (bulk.values.scale, step.values.scale),
                 (bulk.k_res[:, :, :3], step.k_res[:, :, :3])):
        assert torch.equal(a, b)
    assert np.isfinite(bulk.k_res.numpy()).all()


def test_cpu_shortcut_equals_the_device_path(monkeypatch):
    """On CPU the attention dequantizes only the codes some row holds; off, it reads them all
    (the device path): the same numbers, rows at different lengths included."""
    from kvcompile.runtime import ops

    storage = Storage(4, 2, 4)
    gen = torch.Generator().manual_seed(9)
    buf = QuantizedFullBuffer.empty(3, 2, 40, 6, storage)
    for _ in range(13):  # rows in step, then row 1 alone runs ahead
        x = torch.randn(3, 2, 1, 6, 2, generator=gen)
        buf.write(x[..., 0], x[..., 1])
    ahead = buf.rows(1, 2)
    for _ in range(9):
        x = torch.randn(1, 2, 1, 6, 2, generator=gen)
        ahead.write(x[..., 0], x[..., 1])
    q = torch.randn(3, 4, 1, 6, generator=gen)
    fast = buf.attend(q)
    monkeypatch.setattr(ops, "CPU_SHORTCUTS", False)
    torch.testing.assert_close(buf.attend(q), fast, rtol=0, atol=1e-6)
    assert buf.length.tolist() == [13, 22, 13]


@pytest.mark.parametrize("full_storage,budget_storage", [
    (Storage(8, 4, 4), Storage(4, 2, 4)),
    (Storage(4, 4, 3), Storage.parse("full")),
    (Storage.parse("full"), Storage(8, 8, 4)),
])
def test_a_multi_token_extend_is_its_decode_steps_bit_for_bit(full_storage, budget_storage, monkeypatch):
    """``extend`` of T tokens on a layer with codes computes what T one-token extends do, to
    the bit, state included; it dequantizes each group's codes once per change of their
    count (a flush of the full heads' ring), not once per token."""
    from kvcompile.runtime import quant_ops

    d, g, batch, prompt_len, n_new = 6, 2, 2, 9, 11
    layout = BudgetLayout(2, 1, 3, 4)
    plan = LayerPlan((0,), (1, 2), layout, full_storage=full_storage, budget_storage=budget_storage)
    q, k, v = random_qkv(3, batch, 3, g, prompt_len + n_new, d)
    layers = [LayerKV.allocate(plan, batch, prompt_len + n_new, d, g, F64) for _ in range(2)]
    for layer in layers:
        layer.prefill(q[:, :, :prompt_len], k[:, :, :prompt_len], v[:, :, :prompt_len], 0.4,
                      Selection("attention", 3))
    decoded = []
    original = quant_ops._dequantized
    monkeypatch.setattr(quant_ops, "_dequantized", lambda *a: decoded.append(a[6].tolist()) or original(*a))
    new = slice(prompt_len, prompt_len + n_new)
    together = layers[0].extend(q[:, :, new], k[:, :, new], v[:, :, new], 0.4)
    calls = len(decoded)
    steps = torch.cat([layers[1].extend(q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1], 0.4)
                       for p in range(prompt_len, prompt_len + n_new)], dim=2)
    assert torch.equal(together, steps)
    for a, b in zip(_state(layers[0]), _state(layers[1]), strict=True):
        assert torch.equal(a, b)
    # once per group for the selected codes, once per body length for the full heads' codes
    bodies = {(n // full_storage.group) * full_storage.group
              for n in range(prompt_len + 1, prompt_len + n_new + 1)} if full_storage.quantized else set()
    assert calls == len(bodies) + int(budget_storage.quantized)
    assert len(decoded) - calls == n_new * (int(full_storage.quantized) + int(budget_storage.quantized))


def _state(layer: LayerKV) -> list[torch.Tensor]:
    """Every tensor a layer's groups hold."""
    from dataclasses import fields, is_dataclass

    out = []

    def walk(obj) -> None:
        if isinstance(obj, torch.Tensor):
            out.append(obj)
        elif is_dataclass(obj):
            for f in fields(obj):
                walk(getattr(obj, f.name))

    walk(layer.full)
    walk(layer.budgeted)
    return out
