"""The static-budget cache against a reference that keeps the whole token history.

The reference never updates state incrementally: at every step it recomputes from the full
history which tokens are sinks, selected, in the window, or evicted-and-folded, and attends
over that set by hand (the compensation token with logit + ln n).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompile.memory import plan_state_bytes
from kvcompile.plan import BudgetLayout, LayerPlan, Plan, Selection, Storage
from kvcompile.runtime import ops
from kvcompile.runtime.cache import (
    BudgetedBuffer,
    ContextOverflowError,
    FullBuffer,
    LayerKV,
    StaticKVCache,
    compress_prefill,
)

F64 = torch.float64


def softmax_attend(q_vec, keys, values, extra_logits, scale):
    """q_vec [D]; keys/values lists of [D]; extra_logits per key (0 or ln n)."""
    logits = [float(q_vec @ kk) * scale + e for kk, e in zip(keys, extra_logits, strict=True)]
    top = max(logits)
    weights = [math.exp(z - top) for z in logits]
    total = sum(weights)
    return sum(w / total * vv for w, vv in zip(weights, values, strict=True))


def causal_reference(q, k, v, scale, window=0):
    """Plain causal (optionally sliding-window) attention, query position = key position."""
    b_sz, hq, n_tok, _ = q.shape
    g = hq // k.shape[1]
    out = torch.zeros(q.shape, dtype=F64)
    for b in range(b_sz):
        for i in range(hq):
            for p in range(n_tok):
                js = [j for j in range(p + 1) if not window or j > p - window]
                out[b, i, p] = softmax_attend(q[b, i, p], [k[b, i // g, j] for j in js],
                                              [v[b, i // g, j] for j in js], [0.0] * len(js), scale)
    return out


def prompt_scores(q, k, prompt_len, kv_head, b, g, scale, selection, obs):
    """Keep score of every prompt position for one KV head (dict position -> score)."""
    if selection == "key_norm":
        return {j: -float(k[b, kv_head, j].norm()) for j in range(prompt_len)}
    scores = dict.fromkeys(range(prompt_len), 0.0)
    for t in range(max(0, prompt_len - obs), prompt_len):
        for i in range(kv_head * g, (kv_head + 1) * g):
            logits = [float(q[b, i, t] @ k[b, kv_head, j]) * scale for j in range(t + 1)]
            top = max(logits)
            weights = [math.exp(z - top) for z in logits]
            for j, w in enumerate(weights):
                scores[j] += w / sum(weights)
    return scores


def kept_sets(n_tok, prompt_len, layout, scores):
    """From scratch: (sinks + selected + window positions, folded positions) after n_tok tokens."""
    s, c, h, w = layout.sinks, layout.compensation, layout.selected, layout.window
    sinks = list(range(min(n_tok, s)))
    win_start = max(s, n_tok - w)
    window = list(range(win_start, n_tok))
    evicted = list(range(s, win_start))  # in eviction order
    prompt_middle = list(range(s, max(s, prompt_len - w)))
    if len(prompt_middle) > h:  # scored at prefill; everything evicted later is folded
        selected = sorted(sorted(prompt_middle, key=lambda j: (-scores[j], j))[:h])
    else:  # all of the prompt's middle, then the next evicted tokens while slots remain
        selected = evicted[:h]
    folded = [j for j in evicted if j not in selected] if c else []
    return sinks + selected + window, folded


def budgeted_reference(q, k, v, prompt_len, n_full, layout, scale, selection, obs):
    """Outputs for every position: exact causal during the prompt, then the budgeted rule."""
    b_sz, hq, n_tok, _ = q.shape
    g = hq // k.shape[1]
    out = causal_reference(q, k, v, scale)  # full heads and the prompt are exact
    for b in range(b_sz):
        for kv_head in range(n_full, k.shape[1]):
            scores = prompt_scores(q, k, prompt_len, kv_head, b, g, scale, selection, obs)
            for p in range(prompt_len, n_tok):
                kept, folded = kept_sets(p + 1, prompt_len, layout, scores)
                keys = [k[b, kv_head, j] for j in kept]
                values = [v[b, kv_head, j] for j in kept]
                extra = [0.0] * len(kept)
                if folded:
                    keys.append(torch.stack([k[b, kv_head, j] for j in folded]).mean(0))
                    values.append(torch.stack([v[b, kv_head, j] for j in folded]).mean(0))
                    extra.append(math.log(len(folded)))
                for i in range(kv_head * g, (kv_head + 1) * g):
                    out[b, i, p] = softmax_attend(q[b, i, p], keys, values, extra, scale)
    return out


def run_layer(layer, q, k, v, prompt_len, chunks, scale, selection, obs):
    outs = [layer.prefill(q[:, :, :prompt_len], k[:, :, :prompt_len], v[:, :, :prompt_len],
                          scale, Selection(selection, obs))]
    pos = prompt_len
    for t in chunks:
        outs.append(layer.extend(q[:, :, pos:pos + t], k[:, :, pos:pos + t],
                                 v[:, :, pos:pos + t], scale))
        pos += t
    return torch.cat(outs, dim=2)


def make_layer(n_full, n_budget, layout, batch, max_context, d, g, dtype=F64):
    plan = LayerPlan(tuple(range(n_full)), tuple(range(n_full, n_full + n_budget)),
                     layout if n_budget else None)
    return LayerKV.allocate(plan, batch, max_context, d, g, dtype)


def random_qkv(seed, batch, hkv, g, n_tok, d, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hkv * g, n_tok, d, generator=gen, dtype=dtype)
    k = torch.randn(batch, hkv, n_tok, d, generator=gen, dtype=dtype)
    v = torch.randn(batch, hkv, n_tok, d, generator=gen, dtype=dtype)
    return q, k, v


layouts = st.builds(BudgetLayout, st.integers(0, 3), st.integers(0, 1), st.integers(0, 3),
                    st.integers(1, 4))


@settings(max_examples=80, deadline=None)
@given(
    layout=layouts,
    n_full=st.integers(0, 1),
    n_budget=st.integers(1, 2),
    g=st.integers(1, 2),
    batch=st.integers(1, 2),
    prompt_len=st.integers(1, 14),
    chunks=st.lists(st.integers(1, 3), max_size=6),
    selection=st.sampled_from(["key_norm", "attention"]),
    obs=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_layer_matches_history_reference(layout, n_full, n_budget, g, batch, prompt_len, chunks,
                                         selection, obs, seed):
    d, scale = 4, 0.6
    n_tok = prompt_len + sum(chunks)
    q, k, v = random_qkv(seed, batch, n_full + n_budget, g, n_tok, d)
    layer = make_layer(n_full, n_budget, layout, batch, n_tok, d, g)
    got = run_layer(layer, q, k, v, prompt_len, chunks, scale, selection, obs)
    want = budgeted_reference(q, k, v, prompt_len, n_full, layout, scale, selection, obs)
    torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)
    assert layer.length == n_tok


@settings(max_examples=40, deadline=None)
@given(layout=layouts, prompt_len=st.integers(1, 10), steps=st.integers(0, 10),
       seed=st.integers(0, 2**31 - 1))
def test_within_token_slots_equals_full_attention(layout, prompt_len, steps, seed):
    """Nothing is ever evicted, so the budgeted heads are exact."""
    prompt_len = min(prompt_len, layout.token_slots)
    steps = min(steps, layout.token_slots - prompt_len)
    d, scale = 4, 0.5
    n_tok = prompt_len + steps
    q, k, v = random_qkv(seed, 1, 2, 2, n_tok, d)
    layer = make_layer(0, 2, layout, 1, n_tok, d, 2)
    got = run_layer(layer, q, k, v, prompt_len, [1] * steps, scale, "key_norm", 4)
    torch.testing.assert_close(got, causal_reference(q, k, v, scale), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("window,chunks", [(3, [1, 1, 2, 1]), (5, [3, 1])])
def test_sliding_layer_matches_sliding_window_attention(window, chunks):
    plan = LayerPlan((), (0, 1), BudgetLayout(0, 0, 0, window), sliding=True)
    layer = LayerKV.allocate(plan, 2, 64, 4, 2, F64)
    assert layer.sliding_window == window
    n_tok = 9 + sum(chunks)
    q, k, v = random_qkv(7, 2, 2, 2, n_tok, 4)
    got = run_layer(layer, q, k, v, 9, chunks, 0.5, "attention", 4)
    torch.testing.assert_close(got, causal_reference(q, k, v, 0.5, window), atol=1e-10,
                               rtol=1e-10)


def test_compress_prefill_ties_go_to_earlier_positions_and_keep_order():
    layout = BudgetLayout(1, 1, 2, 2)
    k = torch.arange(10, dtype=F64).reshape(1, 1, 10, 1).repeat(1, 1, 1, 2)
    scores = torch.zeros(1, 1, 10, dtype=F64)
    scores[0, 0, 6] = 1.0  # middle = positions 1..7; 6 wins, then the tie goes to 1
    buf = compress_prefill(k, k * 2, scores, layout)
    # window 8, 9 = offsets 7, 8 after the sink -> ring slots 1, 0
    assert buf.k[0, 0, :, 0].tolist() == [0, (2 + 3 + 4 + 5 + 7) / 5, 1, 6, 9, 8]
    assert buf.v[0, 0, 1, 0].item() == pytest.approx(2 * (2 + 3 + 4 + 5 + 7) / 5)
    assert buf.bias[0, 0].tolist() == pytest.approx([0, math.log(5), 0, 0, 0, 0])
    assert buf.counters.tolist() == [[1, 9, 2, 5]]


def test_compress_prefill_without_scores_keeps_most_recent_middle_and_ring_order():
    layout = BudgetLayout(2, 0, 2, 3)
    k = torch.arange(12, dtype=F64).reshape(1, 1, 12, 1)
    buf = compress_prefill(k, k, None, layout)
    # sinks 0,1; middle 2..8 -> keep 7,8, drop the rest (c = 0); window 9,10,11 pushed as
    # offsets 7,8,9 after the sinks -> ring slots 1,2,0
    assert buf.k[0, 0, :, 0].tolist() == [0, 1, 7, 8, 11, 9, 10]
    assert buf.counters.tolist() == [[2, 10, 2, 0]]
    assert torch.isfinite(buf.bias).all()


def test_compress_prefill_short_prompt_leaves_empty_slots_masked():
    layout = BudgetLayout(3, 1, 2, 4)
    k = torch.ones(2, 1, 2, 3)
    buf = compress_prefill(k, k, None, layout)
    assert buf.bias[0, 0].tolist() == [0, 0] + [float("-inf")] * 8
    assert buf.counters.tolist() == [[2, 0, 0, 0]] * 2


@pytest.mark.parametrize("layout,prompt_len", [
    (BudgetLayout(2, 1, 4, 3), 9),   # middle (4) fits the selected slots
    (BudgetLayout(1, 1, 0, 2), 11),  # no selected slots: all of the middle is folded
    (BudgetLayout(0, 0, 3, 1), 2),
    (BudgetLayout(3, 1, 2, 4), 2),   # shorter than the sinks
])
def test_compress_prefill_equals_token_by_token_decode_rule(layout, prompt_len):
    _, k, v = random_qkv(11, 2, 2, 1, prompt_len, 4)
    by_prefill = compress_prefill(k, v, None, layout)
    by_decode = BudgetedBuffer.empty(2, 2, 4, layout, F64)
    for t in range(prompt_len):
        by_decode.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    for name in ("k", "v", "bias", "counters"):
        torch.testing.assert_close(getattr(by_prefill, name), getattr(by_decode, name))


def test_decoding_far_past_capacity_keeps_buffers_and_stays_finite():
    layout = BudgetLayout(2, 1, 2, 4)
    batch, heads, d, prompt_len, steps = 1, 2, 8, 6, 5000
    layer = make_layer(0, heads, layout, batch, 0, d, 1, torch.float32)
    buf = layer.budgeted
    ptrs = [t.data_ptr() for t in (buf.k, buf.v, buf.bias, buf.counters)]
    nbytes = layer.nbytes
    q, k, v = random_qkv(5, batch, heads, 1, prompt_len + steps, d, torch.float32)
    layer.prefill(q[:, :, :prompt_len], k[:, :, :prompt_len], v[:, :, :prompt_len])
    finite = True
    for p in range(prompt_len, prompt_len + steps):
        out = layer.extend(q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1])
        finite &= bool(torch.isfinite(out).all())
    assert finite
    assert [t.data_ptr() for t in (buf.k, buf.v, buf.bias, buf.counters)] == ptrs
    assert layer.nbytes == nbytes
    # sinks 0,1; selected 2,3 (the first evicted); window: the last 4; everything else folded
    n_tok = prompt_len + steps
    folded = range(4, n_tok - 4)
    assert buf.counters.tolist() == [[2, n_tok - 2, 2, len(folded)]]
    torch.testing.assert_close(buf.k[:, :, 2], k[:, :, list(folded)].double().mean(2).float(),
                               atol=1e-4, rtol=1e-4)
    assert buf.bias[0, 0, 2].item() == pytest.approx(math.log(len(folded)))
    assert torch.isfinite(buf.k).all() and torch.isfinite(buf.v).all()


def test_full_buffer_overflow_is_a_clear_error():
    full = FullBuffer.empty(1, 2, 8, 4)
    full.write(torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 4))
    with pytest.raises(ContextOverflowError, match=r"max_context=8.*larger max_context") as info:
        full.write(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    assert full.length.tolist() == [6]


@pytest.mark.parametrize("shortcuts", [True, False])
def test_full_buffer_rows_at_different_lengths(monkeypatch, shortcuts):
    """Each row writes after its own filled slots and attends to them alone."""
    monkeypatch.setattr(ops, "CPU_SHORTCUTS", shortcuts)
    full = FullBuffer.empty(2, 1, 8, 2, F64)
    full.length.copy_(torch.tensor([1, 4]))
    k = torch.arange(2 * 2 * 2, dtype=F64).reshape(2, 1, 2, 2) + 1
    full.write(k, -k)
    assert full.length.tolist() == [3, 6]
    assert torch.equal(full.k[0, 0, 1:3], k[0, 0]) and torch.equal(full.k[1, 0, 4:6], k[1, 0])
    assert torch.equal(full.k[0, 0, 3:], torch.zeros(5, 2, dtype=F64))
    q = torch.randn(2, 1, 1, 2, dtype=F64)
    out = full.attend(q, scale=1.0)
    for row, n in ((0, 3), (1, 6)):
        weights = torch.softmax(full.k[row, 0, :n] @ q[row, 0, 0], dim=0)
        torch.testing.assert_close(out[row, 0, 0], weights @ full.v[row, 0, :n])


def test_layer_overflow_leaves_the_budgeted_heads_untouched():
    layer = make_layer(1, 1, BudgetLayout(1, 1, 1, 2), 1, 5, 4, 1)
    q, k, v = random_qkv(0, 1, 2, 1, 7, 4)
    layer.prefill(q[:, :, :4], k[:, :, :4], v[:, :, :4])
    counters = layer.budgeted.counters.clone()
    with pytest.raises(ContextOverflowError):
        layer.extend(q[:, :, 4:7], k[:, :, 4:7], v[:, :, 4:7])
    assert torch.equal(layer.budgeted.counters, counters) and layer.length == 4


def test_prefill_into_non_empty_layer_is_an_error():
    layer = make_layer(1, 1, BudgetLayout(1, 0, 1, 2), 1, 16, 4, 1)
    q, k, v = random_qkv(0, 1, 2, 1, 3, 4)
    layer.prefill(q, k, v)
    with pytest.raises(ValueError, match="non-empty"):
        layer.prefill(q, k, v)
    layer.reset()
    layer.prefill(q, k, v)


PLANS = [
    Plan((
        LayerPlan((0,), (1, 2), BudgetLayout(4, 1, 8, 16)),
        LayerPlan((), (0, 1, 2), BudgetLayout(2, 0, 0, 30)),
        LayerPlan((0, 1, 2), (), None),
    )),
    Plan.uncompressed(3, 2, sliding=(64, None, 64)),
    Plan((  # quantized groups: codes, scales, residual rings (kvcompile.memory)
        LayerPlan((0,), (1, 2), BudgetLayout(4, 1, 40, 16), full_storage=Storage(8, 4, 32),
                  budget_storage=Storage(4, 4, 16)),
        LayerPlan((0, 1, 2), (), None, full_storage=Storage(4, 4, 64)),
        LayerPlan((), (0, 1, 2), BudgetLayout(2, 0, 7, 30), budget_storage=Storage(8, 8, 5)),
    )),
]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_cache_nbytes_equals_plan_prediction(plan, dtype):
    batch, max_context, d = 2, 200, 16
    cache = StaticKVCache.allocate(plan, batch, max_context, d, 3, dtype)
    assert cache.nbytes == plan_state_bytes(plan, d, max_context, dtype.itemsize) * batch
    assert cache.overhead_bytes == batch * 8
    assert len(cache) == len(plan.layers)


def test_static_cache_runs_prefill_and_decode():
    plan = PLANS[0]
    cache = StaticKVCache.allocate(plan, 1, 40, 8, 3, torch.float32)
    nbytes = cache.nbytes
    q, k, v = random_qkv(2, 1, 3, 3, 40, 8, torch.float32)
    for layer in cache:
        out = layer.prefill(q[:, :, :30], k[:, :, :30], v[:, :, :30], None, Selection("attention", 16))
        assert out.shape == (1, 9, 30, 8)
    for p in range(30, 40):
        for layer in cache:
            out = layer.extend(q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1])
            assert out.shape == (1, 9, 1, 8) and torch.isfinite(out).all()
    assert cache.length == 40 and cache.nbytes == nbytes
    with pytest.raises(ContextOverflowError):
        next(iter(cache)).extend(q[:, :, :1], k[:, :, :1], v[:, :, :1])
    cache.reset()
    assert cache.length == 0
