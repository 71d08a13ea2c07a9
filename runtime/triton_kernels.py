"""Triton kernels for the decode shapes of the two ``kvcompile`` ops (CUDA; CPU interpreter).

Imported by :mod:`kvcompile.runtime.kernels` only when CUDA and Triton are present, and by the
tests on CPU under ``TRITON_INTERPRET=1`` (set before this module is imported). The plain-torch
references in :mod:`kvcompile.runtime.ops` define what every kernel computes; the launchers here
only cover the decode step (one query per row), everything else stays with the reference.

Decode attention (``budgeted_attention`` with ``T == 1``)
    One program serves one (batch row, KV head) and **all** ``G`` query heads of its group: the
    group's queries are a ``[BLOCK_H, D]`` tile (``G`` padded to at least 16 rows, the smallest
    ``tl.dot`` tile; padded rows load as 0 and are never stored), so every K/V tile is read from
    memory once per group, not once per query head. Slots are visited in ``BLOCK_N`` tiles with
    an online softmax (running max ``m``, running sum ``l``, fp32 accumulator). A slot's logit
    is ``q.k * scale + bias`` (``0`` occupied, ``ln n`` compensation, ``-inf`` empty); slots at
    or past the row's ``kv_length`` are ``-inf``. The running max is replaced by 0 while it is
    ``-inf`` (``exp(-inf - 0) = 0``, never ``exp(nan)``), and a row whose every slot is masked
    ends with ``l = 0`` and returns 0, as the reference does.

    Every load is upcast to fp32 at once (the interpreter's bf16 is not reliable, and it keeps
    one arithmetic for every input dtype). The two products run as ``tl.dot`` in fp32: with
    ``input_precision="tf32"`` for fp16/bf16 inputs (exact there: fp16 and bf16 values are tf32
    values, and the scale multiplies the fp32 scores after ``Q.K``, so only the probabilities of
    ``P.V`` are rounded, to 10 mantissa bits) and ``"ieee"``
    for fp32 inputs (the 1e-5 the tests demand).

Split-K / flash-decoding (the full heads' ``max_context`` buffers)
    The same inner loop, with the slots cut into ``num_splits`` chunks: program
    ``(row x KV head, split)`` writes its partial ``(m, l, acc)`` to an fp32 workspace, and a
    combine kernel (one program per query head) merges the partials by log-sum-exp. The split
    count depends on shapes only (buffer size, rows x heads, SM count), never on ``kv_length``,
    so the launch is the same every step and a CUDA graph can replay it. A split that starts at
    or past its row's length loops zero times and stores nothing; the combine reads only the
    ``cdiv(length, chunk)`` splits that hold keys, so unwritten workspace is never read.

Cache update (``budgeted_cache_update``)
    One program per batch row, all heads of the row as one ``[BLOCK_H, BLOCK_D]`` tile: read the
    row's counters, the oldest window token and the compensation slot; a barrier; then write
    (move to the next selected slot, or fold ``(n * x + x_old) / (n + 1)``, the first fold a
    copy), the new token into its slot, the bias entries and the counters. The barrier orders
    every read before any write across the program's threads (the new token overwrites the slot
    the old one is read from, and the counters are read by all threads and written by one).
    The fold is the reference's fp32 arithmetic rounding for rounding: launched with
    ``enable_fp_fusion=False`` (no mul+add contracted into one FMA), division by
    ``tl.math.div_rn`` (IEEE round-to-nearest, not the approximate division). The bias
    ``ln(n + 1)`` is computed in float64 and rounded to the bias dtype, the one definition of it
    (``ops.log_count``) that the references and ``compress_prefill`` follow too.

CUDA graphs: no host reads, no autotuning (block sizes and split counts come from shapes), and
outputs and workspaces are allocated by shape only, so the launches can be captured.
Layer sizes (capacity, lengths, layout) are runtime arguments, not compile-time constants, so
one compiled variant serves every layer of a model; only the head dim, the group size and the
block sizes are ``tl.constexpr``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "KV_DTYPES",
    "cache_update",
    "decode_attention",
    "plan_splits",
    "unsupported_attention",
    "unsupported_update",
]

KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The K/V (and query) dtypes the kernels serve; others (float64) stay with the reference."""
BIAS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # one [BLOCK_H, D] fp32 accumulator per program must stay in registers
MAX_GROUP = 64
SINGLE_PROGRAM_SLOTS = 512
"""Buffers of at most this many slots get one program per (row, KV head) and no combine (a
budgeted head's few hundred slots): below it, a second launch costs more than it saves."""
MIN_SPLIT_SLOTS = 256
"""Smallest chunk of a split: its fixed cost (query load, partial store, combine share) is paid
once per chunk."""
PROGRAMS_PER_SM = 4  # split-K aims at this many programs per SM over a full buffer
_COMBINE_BLOCK = 32  # partials merged per combine iteration


# -- attention ----------------------------------------------------------------------------------

@triton.jit
def _attend_slots(q, scale, k_row, v_row, bias_row, lo, hi, stride_ks, stride_kd, stride_vs,
                  stride_vd, stride_bias_s, offs_d, d_mask,
                  HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax of the group's queries ``q [BLOCK_H, BLOCK_D]`` (fp32, unscaled: the
    product of loaded values stays exact in tf32) over the slots ``[lo, hi)`` of one KV head:
    returns the running max, sum and unnormalised output."""
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + offs_n0
        n_mask = offs_n < hi
        tile_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_row + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                    mask=tile_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_H, BLOCK_N]
        if HAS_BIAS:
            bias = tl.load(bias_row + offs_n * stride_bias_s, mask=n_mask,
                           other=float("-inf")).to(tl.float32)
            scores = scores + bias[None, :]
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: exp(-inf) = 0
        p = tl.exp(scores - m_ref[:, None])
        alpha = tl.exp(m_i - m_ref)
        v = tl.load(v_row + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=tile_mask, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _load_group_queries(q_ptr, row, kv_head, stride_qb, stride_qh, stride_qd, offs_h,
                        offs_d, h_mask, d_mask, GROUP: tl.constexpr):
    """The ``G`` query heads of KV head ``kv_head`` as an fp32 ``[BLOCK_H, BLOCK_D]`` tile."""
    heads = (kv_head * GROUP + offs_h).to(tl.int64)
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=h_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    return q


@triton.jit
def _valid_slots(length_ptr, row, n_slots, HAS_LENGTH: tl.constexpr):
    """Slots of this row that hold keys: the buffer size, or the row's ``kv_length`` in it."""
    hi = n_slots
    if HAS_LENGTH:
        length = tl.load(length_ptr + row)
        hi = tl.minimum(tl.maximum(length, 0), n_slots).to(tl.int32)
    return hi


@triton.jit
def _grouped_decode_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, length_ptr, out_ptr, scale, n_slots, n_kv_heads,
        stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd, stride_bias_b, stride_bias_h, stride_bias_s,
        stride_ob, stride_oh, stride_od,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_LENGTH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program per (row, KV head): the whole buffer, normalised output of its G heads."""
    pid = tl.program_id(0)
    row = (pid // n_kv_heads).to(tl.int64)
    kv_head = (pid % n_kv_heads).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    q = _load_group_queries(q_ptr, row, kv_head, stride_qb, stride_qh, stride_qd, offs_h,
                            offs_d, h_mask, d_mask, GROUP)
    hi = _valid_slots(length_ptr, row, n_slots, HAS_LENGTH)
    m_i, l_i, acc = _attend_slots(
        q, scale, k_ptr + row * stride_kb + kv_head * stride_kh,
        v_ptr + row * stride_vb + kv_head * stride_vh,
        bias_ptr + row * stride_bias_b + kv_head * stride_bias_h if HAS_BIAS else bias_ptr,
        0, hi, stride_ks, stride_kd, stride_vs, stride_vd, stride_bias_s, offs_d, d_mask,
        HAS_BIAS, BLOCK_H, BLOCK_N, BLOCK_D, DOT_PRECISION)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # no visible slot: acc is 0, output 0
    heads = (kv_head * GROUP + offs_h).to(tl.int64)
    tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])


@triton.jit
def _split_decode_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, length_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
        scale, n_slots, n_kv_heads, split_slots, n_splits,
        stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd, stride_bias_b, stride_bias_h, stride_bias_s,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_LENGTH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (row x KV head, split): partial max, sum and output over one chunk of slots.

    Workspace layout (fp32, contiguous): ``m, l [rows*heads, n_splits, BLOCK_H]``,
    ``acc [rows*heads, n_splits, BLOCK_H, BLOCK_D]``.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    row = (pid // n_kv_heads).to(tl.int64)
    kv_head = (pid % n_kv_heads).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    lo = split * split_slots
    hi = tl.minimum(_valid_slots(length_ptr, row, n_slots, HAS_LENGTH), lo + split_slots)
    q = _load_group_queries(q_ptr, row, kv_head, stride_qb, stride_qh, stride_qd, offs_h,
                            offs_d, h_mask, d_mask, GROUP)
    m_i, l_i, acc = _attend_slots(  # zero iterations when the chunk starts past the row's keys
        q, scale, k_ptr + row * stride_kb + kv_head * stride_kh,
        v_ptr + row * stride_vb + kv_head * stride_vh,
        bias_ptr + row * stride_bias_b + kv_head * stride_bias_h if HAS_BIAS else bias_ptr,
        lo, hi, stride_ks, stride_kd, stride_vs, stride_vd, stride_bias_s, offs_d, d_mask,
        HAS_BIAS, BLOCK_H, BLOCK_N, BLOCK_D, DOT_PRECISION)
    # the combine reads exactly the splits that hold keys: the others store nothing
    stored = offs_h < tl.where(lo < hi, GROUP, 0)
    part = pid.to(tl.int64) * n_splits + split
    tl.store(part_m_ptr + part * BLOCK_H + offs_h, m_i, mask=stored)
    tl.store(part_l_ptr + part * BLOCK_H + offs_h, l_i, mask=stored)
    tl.store(part_acc_ptr + (part * BLOCK_H + offs_h[:, None]) * BLOCK_D + offs_d[None, :], acc,
             mask=stored[:, None] & d_mask[None, :])


@triton.jit
def _combine_splits_kernel(
        part_m_ptr, part_l_ptr, part_acc_ptr, length_ptr, out_ptr, n_slots, n_kv_heads,
        split_slots, n_splits, stride_ob, stride_oh, stride_od,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_LENGTH: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per query head: log-sum-exp merge of the splits that hold keys."""
    pid = tl.program_id(0)
    group_pid = pid // GROUP  # = row * n_kv_heads + kv_head, the split kernel's first grid axis
    g = pid % GROUP
    row = (group_pid // n_kv_heads).to(tl.int64)
    head = pid.to(tl.int64) - row * n_kv_heads * GROUP  # query head index within the row
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    hi = _valid_slots(length_ptr, row, n_slots, HAS_LENGTH)
    n_valid = tl.minimum((hi + split_slots - 1) // split_slots, n_splits)
    m_run = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), axis=0)
    l_run = tl.sum(tl.zeros([BLOCK_S], tl.float32), axis=0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    offs_s0 = tl.arange(0, BLOCK_S)
    for s0 in range(0, n_valid, BLOCK_S):
        offs_s = s0 + offs_s0
        s_mask = offs_s < n_valid
        part = (group_pid.to(tl.int64) * n_splits + offs_s) * BLOCK_H + g
        m = tl.load(part_m_ptr + part, mask=s_mask, other=float("-inf"))
        l_s = tl.load(part_l_ptr + part, mask=s_mask, other=0.0)
        a = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp(m - m_ref)  # [BLOCK_S]; a split whose slots were all masked weighs 0
        alpha = tl.exp(m_run - m_ref)
        l_run = l_run * alpha + tl.sum(w * l_s, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * a, axis=0)
        m_run = m_new
    out = acc / tl.where(l_run > 0.0, l_run, 1.0)
    tl.store(out_ptr + row * stride_ob + head * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=d_mask)


# -- cache update -------------------------------------------------------------------------------

@triton.jit
def _cache_update_kernel(
        k_ptr, v_ptr, bias_ptr, counters_ptr, k_new_ptr, v_new_ptr, n_heads,
        sinks, compensation, selected, window,
        stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd,
        stride_bias_b, stride_bias_h, stride_bias_s, stride_cb, stride_cc,
        stride_knb, stride_knh, stride_knd, stride_vnb, stride_vnh, stride_vnd,
        HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per batch row: the decode rule for all heads of the row (see module doc)."""
    row = tl.program_id(0).to(tl.int64)
    counters = counters_ptr + row * stride_cb  # the grid has one program per row: in bounds
    sink_used = tl.load(counters)
    pushed = tl.load(counters + stride_cc)
    sel_used = tl.load(counters + 2 * stride_cc)
    comp_n = tl.load(counters + 3 * stride_cc)

    in_sink = sink_used < sinks
    ring_full = (sink_used >= sinks) & (pushed >= window)
    ring_slot = sinks + compensation + selected + pushed % window  # oldest token / new slot
    to_sel = ring_full & (sel_used < selected)
    to_comp = ring_full & (sel_used >= selected) & (compensation == 1)
    sel_slot = sinks + compensation + sel_used
    new_slot = tl.where(in_sink, sink_used, ring_slot)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    h_mask = offs_h < n_heads
    tile = h_mask[:, None] & d_mask[None, :]
    # the rows that move or fold this step: all heads of the row, or none (a scalar condition
    # turned into a vector mask; the interpreter mistypes `block_mask & scalar_condition`)
    sel_heads = offs_h < tl.where(to_sel, n_heads, 0)
    comp_heads = offs_h < tl.where(to_comp, n_heads, 0)
    heads = offs_h.to(tl.int64)
    k_row = k_ptr + row * stride_kb + heads[:, None] * stride_kh + offs_d[None, :] * stride_kd
    v_row = v_ptr + row * stride_vb + heads[:, None] * stride_vh + offs_d[None, :] * stride_vd
    bias_row = bias_ptr + row * stride_bias_b + heads * stride_bias_h

    # reads: every slot index below is < capacity, so the loads stay in bounds for any state
    k_old = tl.load(k_row + ring_slot * stride_ks, mask=tile)
    v_old = tl.load(v_row + ring_slot * stride_vs, mask=tile)
    k_cur = tl.load(k_row + sinks * stride_ks, mask=tile)
    v_cur = tl.load(v_row + sinks * stride_vs, mask=tile)
    k_in = tl.load(k_new_ptr + row * stride_knb + heads[:, None] * stride_knh
                   + offs_d[None, :] * stride_knd, mask=tile)
    v_in = tl.load(v_new_ptr + row * stride_vnb + heads[:, None] * stride_vnh
                   + offs_d[None, :] * stride_vnd, mask=tile)
    tl.debug_barrier()  # every read above happens before any write below, in every thread

    # the evicted token moves into the next selected slot
    move_tile = sel_heads[:, None] & d_mask[None, :]
    tl.store(k_row + sel_slot * stride_ks, k_old, mask=move_tile)
    tl.store(v_row + sel_slot * stride_vs, v_old, mask=move_tile)
    tl.store(bias_row + sel_slot * stride_bias_s, tl.zeros([BLOCK_H], tl.float32).to(
        bias_ptr.dtype.element_ty), mask=sel_heads)
    # or is folded into the compensation mean: x <- (n x + x_old) / (n + 1), the first fold a copy
    n = comp_n.to(tl.float32)
    k_mean = tl.math.div_rn(n * k_cur.to(tl.float32) + k_old.to(tl.float32), n + 1.0)
    v_mean = tl.math.div_rn(n * v_cur.to(tl.float32) + v_old.to(tl.float32), n + 1.0)
    k_mean = tl.where(comp_n == 0, k_old.to(tl.float32), k_mean)
    v_mean = tl.where(comp_n == 0, v_old.to(tl.float32), v_mean)
    fold_tile = comp_heads[:, None] & d_mask[None, :]
    tl.store(k_row + sinks * stride_ks, k_mean.to(k_ptr.dtype.element_ty), mask=fold_tile)
    tl.store(v_row + sinks * stride_vs, v_mean.to(v_ptr.dtype.element_ty), mask=fold_tile)
    log_n = tl.log((comp_n + 1).to(tl.float64)).to(bias_ptr.dtype.element_ty)
    tl.store(bias_row + sinks * stride_bias_s, tl.zeros([BLOCK_H], bias_ptr.dtype.element_ty)
             + log_n, mask=comp_heads)
    # the new token takes its slot (a sink, or the ring slot just freed)
    tl.store(k_row + new_slot * stride_ks, k_in.to(k_ptr.dtype.element_ty), mask=tile)
    tl.store(v_row + new_slot * stride_vs, v_in.to(v_ptr.dtype.element_ty), mask=tile)
    tl.store(bias_row + new_slot * stride_bias_s, tl.zeros([BLOCK_H], tl.float32).to(
        bias_ptr.dtype.element_ty), mask=h_mask)
    tl.store(counters, sink_used + in_sink.to(tl.int64))
    tl.store(counters + stride_cc, pushed + (sink_used >= sinks).to(tl.int64))
    tl.store(counters + 2 * stride_cc, sel_used + to_sel.to(tl.int64))
    tl.store(counters + 3 * stride_cc, comp_n + to_comp.to(tl.int64))


# -- launchers ----------------------------------------------------------------------------------

def unsupported_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                          kv_length: Tensor | None, causal: bool, window: int) -> str | None:
    """Why the kernels do not serve this call (the reference does), or None when they do.

    Arguments are assumed valid (``ops._check_attention_args``).
    """
    if q.shape[2] != 1:
        return f"T = {q.shape[2]} queries (the kernels serve decode, T = 1)"
    if window:
        return "a sliding window"
    if q.dtype not in KV_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if bias is not None and bias.dtype not in BIAS_DTYPES:
        return f"bias dtype {bias.dtype}"
    if q.shape[3] > MAX_HEAD_DIM or q.shape[1] // k.shape[1] > MAX_GROUP:
        return f"head dim {q.shape[3]} / group size {q.shape[1] // k.shape[1]}"
    if k.shape[2] == 0 or q.shape[0] == 0:
        return "an empty buffer"
    devices = {t.device for t in (q, k, v, bias, kv_length) if t is not None}
    if len(devices) != 1:
        return f"tensors on several devices {sorted(map(str, devices))}"
    return None


def unsupported_update(k_buf: Tensor, v_buf: Tensor, bias: Tensor, k_new: Tensor,
                       v_new: Tensor) -> str | None:
    """Why the update kernel does not serve this call, or None (arguments assumed valid)."""
    if k_buf.dtype not in KV_DTYPES or v_buf.dtype != k_buf.dtype:
        return f"buffer dtypes {k_buf.dtype} / {v_buf.dtype}"
    if bias.dtype not in BIAS_DTYPES:
        return f"bias dtype {bias.dtype}"
    if k_new.dtype not in KV_DTYPES or v_new.dtype not in KV_DTYPES:
        return f"new token dtypes {k_new.dtype} / {v_new.dtype}"
    if k_buf.shape[3] > MAX_HEAD_DIM:
        return f"head dim {k_buf.shape[3]}"
    return None


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors the split count is planned for (a few for the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: small grids


def _block_n(block_d: int) -> int:
    return max(16, min(64, 8192 // block_d))


def plan_splits(programs: int, n_slots: int, sm_count: int) -> int:
    """Split count for ``programs`` (rows x KV heads) over buffers of ``n_slots``: shapes only.

    One split up to :data:`SINGLE_PROGRAM_SLOTS`; beyond, enough splits for
    :data:`PROGRAMS_PER_SM` programs per SM over a full buffer, each of at least
    :data:`MIN_SPLIT_SLOTS` slots.
    """
    if n_slots <= SINGLE_PROGRAM_SLOTS:
        return 1
    wanted = triton.cdiv(PROGRAMS_PER_SM * sm_count, max(1, programs))
    return max(1, min(wanted, triton.cdiv(n_slots, MIN_SPLIT_SLOTS)))


def _strides(t: Tensor | None, dims: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * dims


def attention_config(dtype: torch.dtype, group: int, head_dim: int,
                     block_n: int | None = None) -> dict:
    """Compile-time constants and launch options of the two attention kernels (one definition
    for the launcher and the ahead-of-time compile check)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    fp32 = dtype == torch.float32
    return dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(16, triton.next_power_of_2(group)),
                BLOCK_N=block_n or _block_n(block_d), BLOCK_D=block_d,
                DOT_PRECISION="ieee" if fp32 else "tf32",
                num_warps=4, num_stages=2 if fp32 else 3,
                enable_fp_fusion=True)  # FMAs welcome here: only the update is bit-exact


def combine_config(group: int, head_dim: int, splits: int) -> dict:
    """Compile-time constants and launch options of the split combine."""
    return dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(16, triton.next_power_of_2(group)),
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                BLOCK_S=min(_COMBINE_BLOCK, triton.next_power_of_2(splits)), num_warps=4,
                enable_fp_fusion=True)


def update_config(heads: int, head_dim: int) -> dict:
    """Compile-time constants and launch options of the cache update: no FMA contraction, so
    the fold rounds like the reference's separate multiply, add and divide."""
    block_h = max(2, triton.next_power_of_2(heads))
    block_d = max(16, triton.next_power_of_2(head_dim))
    return dict(HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
                num_warps=max(1, min(4, block_h * block_d // 256)), enable_fp_fusion=False)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                     kv_length: Tensor | None, scale: float, *, num_splits: int | None = None,
                     block_n: int | None = None, out: Tensor | None = None,
                     partials: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """``budgeted_attention`` for one query per row (``q [B, Hq, 1, D]``), by the kernels.

    ``num_splits`` (default :func:`plan_splits`): 1 runs the one-program-per-(row, KV head)
    kernel, more the split-K kernel and its combine. ``out`` (``q``'s shape and dtype) and
    ``partials`` (the split workspace, see :func:`split_workspace`) let callers and tests
    provide (poisoned) buffers; ``block_n`` overrides the slot tile (a power of two >= 16).
    """
    b, hq, _, d = q.shape
    hkv, n_slots = k.shape[1], k.shape[2]
    group = hq // hkv
    config = attention_config(q.dtype, group, d, block_n)
    config.update(HAS_BIAS=bias is not None, HAS_LENGTH=kv_length is not None)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    splits = num_splits or plan_splits(b * hkv, n_slots, sm_count(q.device))
    block_n = config["BLOCK_N"]
    split_slots = triton.cdiv(triton.cdiv(n_slots, splits), block_n) * block_n
    splits = triton.cdiv(n_slots, split_slots)
    strides = (*_strides(q, 4)[:2], q.stride(3), *k.stride(), *v.stride(), *_strides(bias, 3))
    if splits == 1:
        _grouped_decode_kernel[(b * hkv,)](
            q, k, v, bias, kv_length, out, scale, n_slots, hkv, *strides,
            out.stride(0), out.stride(1), out.stride(3), **config)
        return out
    if partials is None:
        partials = split_workspace(b * hkv, splits, group, d, q.device)
    part_m, part_l, part_acc = partials
    _split_decode_kernel[(b * hkv, splits)](
        q, k, v, bias, kv_length, part_m, part_l, part_acc, scale, n_slots, hkv, split_slots,
        splits, *strides, **config)
    _combine_splits_kernel[(b * hq,)](
        part_m, part_l, part_acc, kv_length, out, n_slots, hkv, split_slots, splits,
        out.stride(0), out.stride(1), out.stride(3), HAS_LENGTH=kv_length is not None,
        **combine_config(group, d, splits))
    return out


def split_workspace(programs: int, splits: int, group: int, head_dim: int,
                    device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised fp32 partials ``m, l [programs, splits, BLOCK_H]`` and
    ``acc [programs, splits, BLOCK_H, BLOCK_D]`` for the split-K kernel (shape-only size)."""
    config = combine_config(group, head_dim, splits)
    block_h, block_d = config["BLOCK_H"], config["BLOCK_D"]
    return (torch.empty(programs, splits, block_h, dtype=torch.float32, device=device),
            torch.empty(programs, splits, block_h, dtype=torch.float32, device=device),
            torch.empty(programs, splits, block_h, block_d, dtype=torch.float32, device=device))


def cache_update(k_buf: Tensor, v_buf: Tensor, bias: Tensor, counters: Tensor, k_new: Tensor,
                 v_new: Tensor, sinks: int, compensation: int, selected: int, window: int) -> None:
    """``budgeted_cache_update`` by one kernel launch (one program per batch row), in place."""
    b, h, _, d = k_buf.shape
    _cache_update_kernel[(b,)](
        k_buf, v_buf, bias, counters, k_new, v_new, h, sinks, compensation, selected, window,
        *k_buf.stride(), *v_buf.stride(), *bias.stride(), *counters.stride(),
        k_new.stride(0), k_new.stride(1), k_new.stride(3),
        v_new.stride(0), v_new.stride(1), v_new.stride(3), **update_config(h, d))
