"""The two custom ops against independent, loop-by-loop references."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompile.plan import BudgetLayout
from kvcompile.runtime import ops
from kvcompile.runtime.ops import budgeted_attention, budgeted_cache_update

NEG_INF = float("-inf")


def naive_attention(q, k, v, bias, causal, window, scale, kv_length=None):
    """One query row at a time, explicit visible-key list, softmax by hand, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    b_sz, hq, t_len, d = q.shape
    hkv, s_len = k.shape[1], k.shape[2]
    g = hq // hkv
    out = torch.zeros(b_sz, hq, t_len, d, dtype=torch.float64)
    for b in range(b_sz):
        n_keys = s_len if kv_length is None else int(kv_length[b])
        for i in range(hq):
            hk = i // g
            for t in range(t_len):
                pos = n_keys - t_len + t
                logits, values = [], []
                for j in range(n_keys):
                    if causal and j > pos:
                        continue
                    if window and j <= pos - window:
                        continue
                    z = float(q[b, i, t] @ k[b, hk, j]) * scale
                    if bias is not None:
                        z += float(bias[b, hk, j])
                    if z != NEG_INF:
                        logits.append(z)
                        values.append(v[b, hk, j])
                if not logits:
                    continue  # no visible key: output 0
                top = max(logits)
                weights = [math.exp(z - top) for z in logits]
                total = sum(weights)
                out[b, i, t] = sum(w / total * val for w, val in zip(weights, values, strict=True))
    return out


def random_bias(gen, shape, dtype=torch.float32):
    """0 (occupied), ln n (compensation), -inf (empty), mixed."""
    choice = torch.randint(0, 4, shape, generator=gen)
    bias = torch.zeros(shape, dtype=dtype)
    bias[choice == 1] = NEG_INF
    ln_n = torch.log(torch.randint(1, 50, shape, generator=gen).to(dtype))
    bias[choice == 2] = ln_n[choice == 2]
    return bias


@st.composite
def attention_case(draw):
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 3))
    g = draw(st.integers(1, 3))
    d = draw(st.sampled_from([4, 8]))
    s_len = draw(st.integers(1, 10))
    causal = draw(st.booleans())
    t_len = draw(st.integers(1, s_len)) if causal else draw(st.integers(1, 4))
    window = draw(st.integers(0, s_len + 1)) if causal else 0
    with_bias = draw(st.booleans())
    # rows filled to different lengths of a preallocated buffer (None: every slot is a key)
    lengths = draw(st.one_of(st.none(), st.lists(st.integers(t_len if causal else 0, s_len),
                                                 min_size=b, max_size=b)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    return b, hkv, g, d, s_len, t_len, causal, window, with_bias, lengths, dtype, seed


@settings(max_examples=80, deadline=None)
@given(attention_case())
def test_budgeted_attention_matches_naive(case):
    b, hkv, g, d, s_len, t_len, causal, window, with_bias, lengths, dtype, seed = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, t_len, d, generator=gen, dtype=dtype)
    k = torch.randn(b, hkv, s_len, d, generator=gen, dtype=dtype)
    v = torch.randn(b, hkv, s_len, d, generator=gen, dtype=dtype)
    bias = random_bias(gen, (b, hkv, s_len)) if with_bias else None
    kv_length = None if lengths is None else torch.tensor(lengths)
    scale = 0.7
    out = budgeted_attention(q, k, v, bias, causal=causal, window=window, scale=scale,
                             kv_length=kv_length)
    assert out.dtype == dtype and out.shape == q.shape
    ref = naive_attention(q, k, v, bias, causal, window, scale, kv_length)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("t_len,window,with_bias", [(1, 0, True), (1, 3, False), (3, 0, False),
                                                     (4, 2, True)])
def test_length_masks_without_cpu_trimming(monkeypatch, t_len, window, with_bias):
    """The device path masks by ``kv_length`` over the whole buffer (CPU trims it first)."""
    monkeypatch.setattr(ops, "CPU_SHORTCUTS", False)
    gen = torch.Generator().manual_seed(t_len * 7 + window)
    q = torch.randn(3, 6, t_len, 8, generator=gen)
    k = torch.randn(3, 2, 11, 8, generator=gen)
    v = torch.randn(3, 2, 11, 8, generator=gen)
    bias = random_bias(gen, (3, 2, 11)) if with_bias else None
    kv_length = torch.tensor([11, 5, t_len])
    out = budgeted_attention(q, k, v, bias, causal=True, window=window, kv_length=kv_length)
    ref = naive_attention(q, k, v, bias, True, window, 8**-0.5, kv_length)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_device_path_reads_nothing_back_to_the_host():
    """On a non-CPU device the reference must not sync: meta tensors refuse any host read."""
    q = torch.empty(2, 4, 1, 8, device="meta")
    k = torch.empty(2, 2, 16, 8, device="meta")
    bias = torch.empty(2, 2, 16, device="meta")
    kv_length = torch.empty(2, dtype=torch.int64, device="meta")
    for args in ((q, k, k, bias, None, False, 0, 0.3), (q, k, k, None, kv_length, True, 4, 0.3),
                 (torch.empty(2, 4, 3, 8, device="meta"), k, k, None, kv_length, True, 0, 0.3)):
        assert ops._budgeted_attention_ref(*args).shape == args[0].shape
    layout = BudgetLayout(2, 1, 3, 4)
    state = (torch.empty(2, 2, layout.capacity, 8, device="meta"),
             torch.empty(2, 2, layout.capacity, 8, device="meta"),
             torch.empty(2, 2, layout.capacity, device="meta"),
             torch.empty(2, 4, dtype=torch.int64, device="meta"))
    new = torch.empty(2, 2, 1, 8, device="meta")
    ops._budgeted_cache_update_impl(*state, new, new, layout.sinks, layout.compensation,
                                    layout.selected, layout.window)


@pytest.mark.parametrize("chunk", [1, 3, 4])
@pytest.mark.parametrize("window", [0, 2, 5])
def test_chunked_queries_cross_chunk_boundaries(monkeypatch, chunk, window):
    monkeypatch.setattr(ops, "QUERY_CHUNK", chunk)
    gen = torch.Generator().manual_seed(chunk * 10 + window)
    q = torch.randn(2, 4, 10, 8, generator=gen)
    k = torch.randn(2, 2, 13, 8, generator=gen)
    v = torch.randn(2, 2, 13, 8, generator=gen)
    bias = random_bias(gen, (2, 2, 13))
    for b in (None, bias):
        out = budgeted_attention(q, k, v, b, causal=True, window=window)
        ref = naive_attention(q, k, v, b, True, window, 1 / math.sqrt(8))
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_unmasked_prefill_uses_fused_kernel_and_matches(monkeypatch, causal):
    """bias None, window 0, T == S: the SDPA path (no explicit mask), GQA included."""
    def refuse(*args, **kwargs):
        raise AssertionError("the masked path must not be used here")

    monkeypatch.setattr(ops, "_attention_chunked", refuse)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 12, 8, generator=gen)
    k = torch.randn(1, 2, 12, 8, generator=gen)
    v = torch.randn(1, 2, 12, 8, generator=gen)
    out = budgeted_attention(q, k, v, causal=causal)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, None, causal, 0, 8**-0.5),
                               atol=1e-5, rtol=1e-5)


def test_fully_masked_row_gives_zero_not_nan():
    q = torch.randn(1, 2, 1, 4)
    k = torch.randn(1, 1, 3, 4)
    v = torch.randn(1, 1, 3, 4)
    bias = torch.full((1, 1, 3), NEG_INF)
    assert torch.equal(budgeted_attention(q, k, v, bias), torch.zeros_like(q))
    q3 = torch.randn(1, 2, 3, 4)
    out = budgeted_attention(q3, k, v, bias, causal=True, window=2)
    assert torch.equal(out, torch.zeros_like(q3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_returns_input_dtype(dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=gen)
    k = torch.randn(2, 2, 9, 16, generator=gen)
    v = torch.randn(2, 2, 9, 16, generator=gen)
    bias = random_bias(gen, (2, 2, 9))
    out = budgeted_attention(q.to(dtype), k.to(dtype), v.to(dtype), bias)
    assert out.dtype == dtype
    ref = naive_attention(q, k, v, bias, False, 0, 0.25)
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)


def test_invalid_arguments_are_rejected():
    q = torch.randn(1, 3, 2, 4)
    k = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="multiple"):
        budgeted_attention(q, k, k)
    k = torch.randn(1, 1, 5, 4)
    with pytest.raises(ValueError, match="causal"):
        budgeted_attention(q, k, k, window=2)
    with pytest.raises(ValueError, match="T <= S"):
        budgeted_attention(torch.randn(1, 1, 6, 4), k, k, causal=True)


def test_opcheck_budgeted_attention():
    gen = torch.Generator().manual_seed(1)
    cases = [
        (torch.randn(1, 4, 1, 8, generator=gen), torch.randn(1, 2, 7, 8, generator=gen),
         random_bias(gen, (1, 2, 7)), False, 0),
        (torch.randn(2, 2, 5, 8, generator=gen), torch.randn(2, 2, 5, 8, generator=gen),
         None, True, 0),
        (torch.randn(1, 3, 4, 8, generator=gen), torch.randn(1, 1, 6, 8, generator=gen),
         None, True, 3),
    ]
    cases.append((torch.randn(2, 4, 1, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen),
                  None, True, 0, torch.tensor([9, 4])))
    cases.append((torch.randn(2, 2, 3, 8, generator=gen), torch.randn(2, 1, 9, 8, generator=gen),
                  random_bias(gen, (2, 1, 9)), True, 2, torch.tensor([5, 3])))
    for q, k, bias, causal, window, *length in cases:
        kv_length = length[0] if length else None
        torch.library.opcheck(torch.ops.kvcompile.budgeted_attention.default,
                              (q, k, k.clone(), bias, kv_length, causal, window, 0.5))


def test_opcheck_budgeted_cache_update():
    layout = BudgetLayout(1, 1, 2, 3)
    for b_sz, pushed in ((1, 0), (2, 7)):
        k_buf = torch.randn(b_sz, 2, layout.capacity, 4)
        bias = torch.zeros(b_sz, 2, layout.capacity)
        counters = torch.tensor([[1, pushed, 1, 2]] * b_sz)
        args = (k_buf, k_buf.clone(), bias, counters, torch.randn(b_sz, 2, 1, 4),
                torch.randn(b_sz, 2, 1, 4), layout.sinks, layout.compensation, layout.selected,
                layout.window)
        torch.library.opcheck(torch.ops.kvcompile.budgeted_cache_update.default, args)


def naive_update(k_buf, v_buf, bias, counters, k_new, v_new, layout):
    """The decode rule of the brief, literally, one batch row at a time (in place)."""
    s, c, h, w = layout.sinks, layout.compensation, layout.selected, layout.window
    for b in range(k_buf.shape[0]):
        sink_used, pushed, sel_used, comp_n = (int(x) for x in counters[b])
        if sink_used < s:
            slot = sink_used
            sink_used += 1
        else:
            if pushed >= w:
                old = s + c + h + pushed % w
                if sel_used < h:
                    dst = s + c + sel_used
                    k_buf[b, :, dst] = k_buf[b, :, old]
                    v_buf[b, :, dst] = v_buf[b, :, old]
                    bias[b, :, dst] = 0.0
                    sel_used += 1
                elif c == 1:
                    n = comp_n
                    k_buf[b, :, s] = (n * k_buf[b, :, s] + k_buf[b, :, old]) / (n + 1)
                    v_buf[b, :, s] = (n * v_buf[b, :, s] + v_buf[b, :, old]) / (n + 1)
                    comp_n += 1
                    bias[b, :, s] = math.log(comp_n)
            slot = s + c + h + pushed % w
            pushed += 1
        k_buf[b, :, slot] = k_new[b, :, 0]
        v_buf[b, :, slot] = v_new[b, :, 0]
        bias[b, :, slot] = 0.0
        counters[b] = torch.tensor([sink_used, pushed, sel_used, comp_n])


@st.composite
def update_case(draw):
    layout = BudgetLayout(draw(st.integers(0, 3)), draw(st.integers(0, 1)),
                          draw(st.integers(0, 3)), draw(st.integers(1, 4)))
    b_sz = draw(st.integers(1, 3))
    rows = []
    for _ in range(b_sz):  # each row its own (reachable-looking) state
        sink_used = draw(st.integers(0, layout.sinks))
        full_sinks = sink_used == layout.sinks
        pushed = draw(st.integers(0, 3 * layout.window)) if full_sinks else 0
        sel_used = draw(st.integers(0, layout.selected)) if pushed >= layout.window else 0
        comp_n = draw(st.integers(0, 5)) if layout.compensation else 0
        rows.append([sink_used, pushed, sel_used, comp_n])
    steps = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    return layout, rows, steps, seed


@settings(max_examples=60, deadline=None)
@given(update_case())
def test_cache_update_matches_decode_rule(case):
    layout, rows, steps, seed = case
    gen = torch.Generator().manual_seed(seed)
    b_sz, heads, d = len(rows), 2, 3
    shape = (b_sz, heads, layout.capacity, d)
    k_buf = torch.randn(shape, generator=gen, dtype=torch.float64)
    v_buf = torch.randn(shape, generator=gen, dtype=torch.float64)
    bias = random_bias(gen, shape[:3])
    counters = torch.tensor(rows, dtype=torch.int64)
    state = [k_buf, v_buf, bias, counters]
    ref = [x.clone() for x in state]
    for _ in range(steps):
        k_new = torch.randn(b_sz, heads, 1, d, generator=gen, dtype=torch.float64)
        v_new = torch.randn(b_sz, heads, 1, d, generator=gen, dtype=torch.float64)
        budgeted_cache_update(*state, k_new, v_new, layout)
        naive_update(*ref, k_new, v_new, layout)
        for got, want in zip(state, ref, strict=True):
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_cache_update_first_fold_sets_compensation_bias():
    layout = BudgetLayout(0, 1, 0, 1)
    k_buf = torch.zeros(1, 1, 2, 2)
    v_buf = torch.zeros(1, 1, 2, 2)
    bias = torch.full((1, 1, 2), NEG_INF)
    counters = torch.zeros(1, 4, dtype=torch.int64)
    tokens = [torch.full((1, 1, 1, 2), float(i)) for i in range(4)]
    for tok in tokens:
        budgeted_cache_update(k_buf, v_buf, bias, counters, tok, tok * 10, layout)
    # ring holds token 3; tokens 0, 1, 2 folded: mean 1, n = 3
    assert counters.tolist() == [[0, 4, 0, 3]]
    torch.testing.assert_close(k_buf[0, 0], torch.tensor([[1.0, 1.0], [3.0, 3.0]]))
    torch.testing.assert_close(v_buf[0, 0], torch.tensor([[10.0, 10.0], [30.0, 30.0]]))
    torch.testing.assert_close(bias[0, 0], torch.tensor([math.log(3), 0.0]))


def test_uniform_fast_path_equals_vectorised_reference():
    """Batch-1 decode takes the slice-copy path; it must stay bit-identical to the reference."""
    gen = torch.Generator().manual_seed(11)
    for layout in (BudgetLayout(2, 1, 3, 4), BudgetLayout(0, 1, 0, 3), BudgetLayout(3, 0, 2, 2)):
        shape = (1, 2, layout.capacity, 4)
        fast = [torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)]
        fast.append(torch.full((1, 2, layout.capacity), float("-inf")))
        fast.append(torch.zeros(1, 4, dtype=torch.long))
        ref = [t.clone() for t in fast]
        for _ in range(30):
            k_new = torch.randn(1, 2, 1, 4, generator=gen)
            v_new = torch.randn(1, 2, 1, 4, generator=gen)
            args = (layout.sinks, layout.compensation, layout.selected, layout.window)
            ops._budgeted_cache_update_uniform(*fast, fast[3][0].tolist(), k_new, v_new, *args)
            ops._budgeted_cache_update_ref(*ref, k_new, v_new, *args)
            for a, b in zip(fast, ref, strict=True):
                assert torch.equal(a, b)


@pytest.mark.parametrize("n", [7, 73223, 100000, 999983])
def test_compensation_bias_has_one_definition(n):
    """Both update paths and prefill compression store ln n rounded once from float64."""
    expected = float(torch.tensor(math.log(n), dtype=torch.float64).float())
    layout = BudgetLayout(0, 1, 0, 1)
    for update in (ops._budgeted_cache_update_ref, "uniform"):
        k_buf = torch.randn(1, 1, 2, 2)
        bias = torch.zeros(1, 1, 2)
        counters = torch.tensor([[0, n, 0, n - 1]])  # ring full: the next token folds the n-th
        state = (k_buf, k_buf.clone(), bias, counters)
        new = torch.randn(1, 1, 1, 2)
        args = (layout.sinks, layout.compensation, layout.selected, layout.window)
        if update == "uniform":
            ops._budgeted_cache_update_uniform(*state, counters[0].tolist(), new, new, *args)
        else:
            update(*state, new, new, *args)
        assert bias[0, 0, 0].item() == expected
    if n <= 100000:
        from kvcompile.runtime.cache import compress_prefill

        k = torch.randn(1, 1, n + 1, 2)
        assert compress_prefill(k, k, None, layout).bias[0, 0, 0].item() == expected
