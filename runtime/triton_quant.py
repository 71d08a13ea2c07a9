"""Triton kernels for the quantized cache's two ops (CUDA; CPU interpreter).

Imported by :mod:`kvcompile.runtime.kernels` with :mod:`kvcompile.runtime.triton_kernels` (only
when CUDA and Triton are present), and by the tests on CPU under ``TRITON_INTERPRET=1``. The
plain-torch references in :mod:`kvcompile.runtime.quant_ops` define what they compute; the
layout is :mod:`kvcompile.runtime.quant`'s (KIVI: keys per channel over token groups, values
per token over channel groups, fp16 scale and zero, ``8 / bits`` codes per byte, low bits first).

Quantized decode attention (``quantized_attention``, ``T == 1``)
    The decode kernel of :mod:`~kvcompile.runtime.triton_kernels` (one program per (row, KV
    head) serving the ``G`` query heads of its group, online softmax over ``BLOCK_N``-slot
    tiles, split-K with the same log-sum-exp combine for long buffers), with the keys and values
    of the quantized part read as codes: each tile loads its ``uint8`` bytes and fp16 scales and
    zeros, unpacks and dequantizes in registers (``code * scale + zero`` in fp32, exact since a
    code has at most 8 bits and a scale 11) and rounds the result to the full-precision part's
    dtype, as the reference stores its dequantized keys. Only the quantized part is split; split
    0 also attends to the full-precision part (masked by ``fp_bias`` or ``fp_length``) and
    merges the two online-softmax states, so there is one softmax over both parts. Every split
    stores its partial (a split past its row's codes stores the empty state ``m = -inf, l = 0``,
    weight 0 in the combine), so the combine needs no length.

Quantized append (``quantized_append``)
    One program per batch row, a loop over the row's heads: the new token goes into ring slot
    ``length % group``; when that fills the ring, the ring (read back, its newest slot taken from
    registers, so no barrier is needed between the write and the read) is quantized into body
    group ``min(length // group, n_groups - 1)``; then ``length += 1``, by the same program, so
    no other program reads the row's length after it changes. The quantization is
    ``quant._affine``'s arithmetic operation for operation: clamp to fp16's range, min / max,
    ``zero = fp16(min)``, ``scale = fp16(min((max - zero) / top, fp16 max))``, codes
    ``clamp(round((x - zero) / scale), 0, top)`` with IEEE division (``tl.math.div_rn``), no FMA
    contraction, and round-half-to-even by adding and subtracting ``1.5 * 2^23`` in fp32 (exact
    for ``|y| < 2^22``; ``y`` is clamped to ``[-1, top + 1]`` first, which changes no final
    code). Codes, scales and zeros are then bit-identical to the reference's (the tests check
    it), as long as the ring's dtype round trip is exact (the new token arrives in the ring's
    dtype, as the runtime passes it; the interpreter truncates fp32 -> bf16 instead of rounding).

Limits (the registered implementation hands anything else to the reference): head dim up to
256; quantization group a power of two (any group works for attention; the append's ring tile
is ``group x`` channels), ring tiles up to :data:`MAX_RING_ELEMENTS`; K/V dtypes fp32, fp16,
bf16 (q, k_fp and v_fp of one dtype); codes ``uint8``, scales and zeros ``float16`` with equal
strides; the ring exactly one group (``residual_tokens == group``, i.e. ``max_context >=
group``); no empty part (no code slots, no full-precision slots, no body to flush into: an
empty CUDA tensor has no pointer to pass). The append keeps the whole ring tile in registers: large rings (``group 128 x d
128``) may spill, which costs time once per ``group`` steps, not correctness.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .quant import CODE_BITS, SCALE_DTYPE, Quantized
from .triton_kernels import (
    BIAS_DTYPES,
    KV_DTYPES,
    MAX_GROUP,
    MAX_HEAD_DIM,
    _attend_slots,
    _combine_splits_kernel,
    _load_group_queries,
    _strides,
    _valid_slots,
    attention_config,
    combine_config,
    plan_splits,
    sm_count,
    split_workspace,
)

__all__ = [
    "MAX_RING_ELEMENTS",
    "quantized_attention_config",
    "quantized_append",
    "quantized_decode_attention",
    "unsupported_quantized_append",
    "unsupported_quantized_attention",
]

MAX_RING_ELEMENTS = 128 * 256
"""Largest ``group x BLOCK_D`` ring tile the append quantizes in one program."""
_FP16_MAX = 65504.0
_ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: y + M - M rounds |y| < 2^22 half to even in fp32


# -- attention ----------------------------------------------------------------------------------

@triton.jit
def _dequantize(codes_row, scale_row, zero_row, fp_ptr, start, offs_n, offs_d, mask, d_mask,
                stride_cs, stride_cc, stride_ss, stride_sc,
                BITS: tl.constexpr, QUANT_GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """A ``[BLOCK_N, BLOCK_D]`` tile of codes (slots from ``start``, a multiple of
    ``BLOCK_N``) as fp32 values rounded to ``fp_ptr``'s dtype.

    ``PER_CHANNEL`` (keys): scale ``[slot // group, channel]``, one row per tile when the tile
    lies in one token group; else (values) ``[slot, channel // group]``. Masked code lanes
    are 0 (their slots' scores and values are masked by the caller)."""
    PER_BYTE: tl.constexpr = 8 // BITS
    byte = tl.load(codes_row + offs_n[:, None] * stride_cs
                   + (offs_d // PER_BYTE)[None, :] * stride_cc, mask=mask, other=0).to(tl.int32)
    code = (byte >> (BITS * (offs_d % PER_BYTE))[None, :]) & ((1 << BITS) - 1)
    if PER_CHANNEL and QUANT_GROUP % BLOCK_N == 0:  # start < length: its group holds keys
        at = (start // QUANT_GROUP) * stride_ss + offs_d * stride_sc
        scale = tl.load(scale_row + at, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        zero = tl.load(zero_row + at, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    else:
        if PER_CHANNEL:
            at = (offs_n // QUANT_GROUP)[:, None] * stride_ss + offs_d[None, :] * stride_sc
        else:
            at = offs_n[:, None] * stride_ss + (offs_d // QUANT_GROUP)[None, :] * stride_sc
        scale = tl.load(scale_row + at, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_row + at, mask=mask, other=0.0).to(tl.float32)
    return (code.to(tl.float32) * scale + zero).to(fp_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _attend_codes(q, scale, kc_row, ks_row, kz_row, vc_row, vs_row, vz_row, fp_ptr, lo, hi,
                  stride_kcs, stride_kcc, stride_kss, stride_ksd,
                  stride_vcs, stride_vcc, stride_vss, stride_vsg, offs_d, d_mask,
                  KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, QUANT_GROUP: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """``_attend_slots`` over the code slots ``[lo, hi)`` of one KV head: running max, sum and
    unnormalised output of the group's queries."""
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + offs_n0
        n_mask = offs_n < hi
        tile_mask = n_mask[:, None] & d_mask[None, :]
        k = _dequantize(kc_row, ks_row, kz_row, fp_ptr, start, offs_n, offs_d, tile_mask,
                        d_mask, stride_kcs, stride_kcc, stride_kss, stride_ksd, KEY_BITS,
                        QUANT_GROUP, True, BLOCK_N)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - m_ref[:, None])
        alpha = tl.exp(m_i - m_ref)
        v = _dequantize(vc_row, vs_row, vz_row, fp_ptr, start, offs_n, offs_d, tile_mask,
                        d_mask, stride_vcs, stride_vcc, stride_vss, stride_vsg, VALUE_BITS,
                        QUANT_GROUP, False, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _quantized_decode_kernel(
        q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, q_length_ptr, kf_ptr, vf_ptr,
        fp_bias_ptr, fp_length_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
        scale, n_codes, n_fp, n_kv_heads, split_slots, n_splits,
        stride_qb, stride_qh, stride_qd,
        stride_kcb, stride_kch, stride_kcs, stride_kcc,
        stride_ksb, stride_ksh, stride_kss, stride_ksd,
        stride_vcb, stride_vch, stride_vcs, stride_vcc,
        stride_vsb, stride_vsh, stride_vss, stride_vsg,
        stride_kfb, stride_kfh, stride_kfs, stride_kfd,
        stride_vfb, stride_vfh, stride_vfs, stride_vfd,
        stride_bias_b, stride_bias_h, stride_bias_s,
        stride_ob, stride_oh, stride_od,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, KEY_BITS: tl.constexpr,
        VALUE_BITS: tl.constexpr, QUANT_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_FP_LENGTH: tl.constexpr, SPLIT: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (row x KV head, split): the split's code slots, and on split 0 the
    full-precision part; the normalised output (one split) or the partial (several; layout of
    ``triton_kernels._split_decode_kernel``)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    row = (pid // n_kv_heads).to(tl.int64)
    kv_head = (pid % n_kv_heads).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    q = _load_group_queries(q_ptr, row, kv_head, stride_qb, stride_qh, stride_qd, offs_h,
                            offs_d, h_mask, d_mask, GROUP)
    lo = split * split_slots
    hi = tl.minimum(_valid_slots(q_length_ptr, row, n_codes, True), lo + split_slots)
    m_i, l_i, acc = _attend_codes(
        q, scale, kc_ptr + row * stride_kcb + kv_head * stride_kch,
        ks_ptr + row * stride_ksb + kv_head * stride_ksh,
        kz_ptr + row * stride_ksb + kv_head * stride_ksh,
        vc_ptr + row * stride_vcb + kv_head * stride_vch,
        vs_ptr + row * stride_vsb + kv_head * stride_vsh,
        vz_ptr + row * stride_vsb + kv_head * stride_vsh, kf_ptr, lo, hi,
        stride_kcs, stride_kcc, stride_kss, stride_ksd, stride_vcs, stride_vcc, stride_vss,
        stride_vsg, offs_d, d_mask, KEY_BITS, VALUE_BITS, QUANT_GROUP, BLOCK_H, BLOCK_N,
        BLOCK_D, DOT_PRECISION)
    fp_hi = _valid_slots(fp_length_ptr, row, n_fp, HAS_FP_LENGTH)
    fp_hi = tl.where(split == 0, fp_hi, 0)  # the full-precision part: split 0's only
    m_f, l_f, acc_f = _attend_slots(
        q, scale, kf_ptr + row * stride_kfb + kv_head * stride_kfh,
        vf_ptr + row * stride_vfb + kv_head * stride_vfh,
        fp_bias_ptr + row * stride_bias_b + kv_head * stride_bias_h if HAS_BIAS else fp_bias_ptr,
        0, fp_hi, stride_kfs, stride_kfd, stride_vfs, stride_vfd, stride_bias_s, offs_d, d_mask,
        HAS_BIAS, BLOCK_H, BLOCK_N, BLOCK_D, DOT_PRECISION)
    m_new = tl.maximum(m_i, m_f)  # merge the two online-softmax states
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha, beta = tl.exp(m_i - m_ref), tl.exp(m_f - m_ref)
    l_i = l_i * alpha + l_f * beta
    acc = acc * alpha[:, None] + acc_f * beta[:, None]
    if SPLIT:
        part = pid.to(tl.int64) * n_splits + split
        tl.store(part_m_ptr + part * BLOCK_H + offs_h, m_new, mask=h_mask)
        tl.store(part_l_ptr + part * BLOCK_H + offs_h, l_i, mask=h_mask)
        tl.store(part_acc_ptr + (part * BLOCK_H + offs_h[:, None]) * BLOCK_D + offs_d[None, :],
                 acc, mask=h_mask[:, None] & d_mask[None, :])
    else:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # no visible slot: output 0
        heads = (kv_head * GROUP + offs_h).to(tl.int64)
        tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh
                 + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
                 mask=h_mask[:, None] & d_mask[None, :])


# -- append -------------------------------------------------------------------------------------

@triton.jit
def _round_codes(y, TOP: tl.constexpr):
    """``clamp(round_half_even(y), 0, TOP)`` in fp32 (see the module doc), as int32."""
    y = tl.minimum(tl.maximum(y, -1.0), TOP + 1.0)
    y = (y + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(y, 0.0), TOP * 1.0).to(tl.int32)


@triton.jit
def _pack(codes, ROWS: tl.constexpr, WIDTH: tl.constexpr, BITS: tl.constexpr):
    """int32 codes ``[ROWS, WIDTH]`` -> bytes ``[ROWS, WIDTH * BITS / 8]`` (low bits first)."""
    PER_BYTE: tl.constexpr = 8 // BITS
    if PER_BYTE == 1:
        return codes
    parts = tl.reshape(codes, [ROWS, WIDTH // PER_BYTE, PER_BYTE])
    shifts = BITS * tl.arange(0, PER_BYTE)
    return tl.sum(parts << shifts[None, None, :], axis=2)  # disjoint bits: the sum is the OR


@triton.jit
def _fp16_scale_zero(lo, hi, TOP: tl.constexpr):
    """``quant._affine``'s fp16 zero and scale from fp32 min / max, and the fp32 divisor."""
    zero = lo.to(tl.float16)
    span = hi - zero.to(tl.float32)
    scale = tl.minimum(tl.math.div_rn(span, tl.full(span.shape, TOP, tl.float32)), 65504.0)
    scale = scale.to(tl.float16)
    safe = tl.where(scale == 0.0, 1.0, scale.to(tl.float32))
    return zero, scale, safe


@triton.jit
def _quantize_ring_keys(ring, kc_rows, ks_ptr, kz_ptr, offs_d, d_mask, stride_kcc, stride_ksd,
                        QUANT_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_D: tl.constexpr, BITS: tl.constexpr):
    """Keys: per channel over the ring's ``QUANT_GROUP`` tokens (``ring`` fp32 ``[G, W]``)."""
    TOP: tl.constexpr = (1 << BITS) - 1
    PER_BYTE: tl.constexpr = 8 // BITS
    x = tl.minimum(tl.maximum(ring, -65504.0), 65504.0)
    zero, scale, safe = _fp16_scale_zero(tl.min(x, axis=0), tl.max(x, axis=0), TOP)
    y = tl.math.div_rn(x - zero.to(tl.float32)[None, :], tl.zeros_like(x) + safe[None, :])
    codes = tl.where(d_mask[None, :], _round_codes(y, TOP), 0)
    packed = _pack(codes, QUANT_GROUP, BLOCK_D, BITS)
    offs_c = tl.arange(0, BLOCK_D // PER_BYTE)
    tl.store(kc_rows + offs_c[None, :] * stride_kcc, packed.to(tl.uint8),
             mask=(offs_c * PER_BYTE < HEAD_DIM)[None, :])
    tl.store(ks_ptr + offs_d * stride_ksd, scale, mask=d_mask)
    tl.store(kz_ptr + offs_d * stride_ksd, zero, mask=d_mask)


@triton.jit
def _quantize_ring_values(ring, vc_rows, vs_rows, vz_rows, offs_d, d_mask, stride_vcc,
                          stride_vsg, QUANT_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_D: tl.constexpr, BITS: tl.constexpr):
    """Values: per token over groups of ``QUANT_GROUP`` channels (a last partial group over
    the channels it has, padded lanes excluded from its range and stored as code 0)."""
    TOP: tl.constexpr = (1 << BITS) - 1
    PER_BYTE: tl.constexpr = 8 // BITS
    N_GROUPS: tl.constexpr = BLOCK_D // QUANT_GROUP
    x = tl.minimum(tl.maximum(ring, -65504.0), 65504.0)
    x3 = tl.reshape(x, [QUANT_GROUP, N_GROUPS, QUANT_GROUP])
    valid = tl.reshape(tl.broadcast_to(d_mask[None, :], [QUANT_GROUP, BLOCK_D]),
                       [QUANT_GROUP, N_GROUPS, QUANT_GROUP])
    lo = tl.min(tl.where(valid, x3, float("inf")), axis=2)  # [tokens, groups]
    hi = tl.max(tl.where(valid, x3, float("-inf")), axis=2)
    offs_g = tl.arange(0, N_GROUPS)
    g_mask = offs_g * QUANT_GROUP < HEAD_DIM
    lo = tl.where(g_mask[None, :], lo, 0.0)  # groups of padding only: no inf arithmetic
    hi = tl.where(g_mask[None, :], hi, 0.0)
    zero, scale, safe = _fp16_scale_zero(lo, hi, TOP)
    y = tl.math.div_rn(x3 - zero.to(tl.float32)[:, :, None],
                       tl.zeros_like(x3) + safe[:, :, None])
    codes = tl.where(valid, _round_codes(y, TOP), 0)
    packed = _pack(tl.reshape(codes, [QUANT_GROUP, BLOCK_D]), QUANT_GROUP, BLOCK_D, BITS)
    offs_c = tl.arange(0, BLOCK_D // PER_BYTE)
    tl.store(vc_rows + offs_c[None, :] * stride_vcc, packed.to(tl.uint8),
             mask=(offs_c * PER_BYTE < HEAD_DIM)[None, :])
    tl.store(vs_rows + offs_g[None, :] * stride_vsg, scale, mask=g_mask[None, :])
    tl.store(vz_rows + offs_g[None, :] * stride_vsg, zero, mask=g_mask[None, :])


@triton.jit
def _quantized_append_kernel(
        kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, kr_ptr, vr_ptr, length_ptr,
        kn_ptr, vn_ptr, n_heads, n_groups,
        stride_kcb, stride_kch, stride_kcs, stride_kcc,
        stride_ksb, stride_ksh, stride_ksg, stride_ksd,
        stride_vcb, stride_vch, stride_vcs, stride_vcc,
        stride_vsb, stride_vsh, stride_vss, stride_vsg,
        stride_krb, stride_krh, stride_krs, stride_krd,
        stride_vrb, stride_vrh, stride_vrs, stride_vrd,
        stride_knb, stride_knh, stride_knd, stride_vnb, stride_vnh, stride_vnd,
        HEAD_DIM: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr,
        QUANT_GROUP: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per batch row, all its heads (see the module doc)."""
    row = tl.program_id(0).to(tl.int64)
    length = tl.load(length_ptr + row)
    slot = length % QUANT_GROUP
    flush = (slot == QUANT_GROUP - 1) & (n_groups > 0)
    target = tl.minimum(length // QUANT_GROUP, n_groups - 1)
    tokens = (target * QUANT_GROUP + tl.arange(0, QUANT_GROUP)).to(tl.int64)
    offs_t = tl.arange(0, QUANT_GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    ring_mask = (offs_t[:, None] < QUANT_GROUP) & d_mask[None, :]
    for h in range(n_heads):
        head = row * 0 + h  # int64 in the interpreter and compiled alike
        k_ring = kr_ptr + row * stride_krb + head * stride_krh
        v_ring = vr_ptr + row * stride_vrb + head * stride_vrh
        k_in = tl.load(kn_ptr + row * stride_knb + head * stride_knh + offs_d * stride_knd,
                       mask=d_mask).to(kr_ptr.dtype.element_ty)
        v_in = tl.load(vn_ptr + row * stride_vnb + head * stride_vnh + offs_d * stride_vnd,
                       mask=d_mask).to(vr_ptr.dtype.element_ty)
        tl.store(k_ring + slot * stride_krs + offs_d * stride_krd, k_in, mask=d_mask)
        tl.store(v_ring + slot * stride_vrs + offs_d * stride_vrd, v_in, mask=d_mask)
        if flush:
            newest = (offs_t == slot)[:, None]  # from registers: no read-after-write hazard
            k_all = tl.load(k_ring + offs_t[:, None] * stride_krs + offs_d[None, :] * stride_krd,
                            mask=ring_mask, other=0.0)
            v_all = tl.load(v_ring + offs_t[:, None] * stride_vrs + offs_d[None, :] * stride_vrd,
                            mask=ring_mask, other=0.0)
            k_all = tl.where(newest, k_in[None, :], k_all).to(tl.float32)
            v_all = tl.where(newest, v_in[None, :], v_all).to(tl.float32)
            _quantize_ring_keys(
                k_all, kc_ptr + row * stride_kcb + head * stride_kch
                + tokens[:, None] * stride_kcs,
                ks_ptr + row * stride_ksb + head * stride_ksh + target * stride_ksg,
                kz_ptr + row * stride_ksb + head * stride_ksh + target * stride_ksg,
                offs_d, d_mask, stride_kcc, stride_ksd, QUANT_GROUP, HEAD_DIM, BLOCK_D, KEY_BITS)
            _quantize_ring_values(
                v_all, vc_ptr + row * stride_vcb + head * stride_vch
                + tokens[:, None] * stride_vcs,
                vs_ptr + row * stride_vsb + head * stride_vsh + tokens[:, None] * stride_vss,
                vz_ptr + row * stride_vsb + head * stride_vsh + tokens[:, None] * stride_vss,
                offs_d, d_mask, stride_vcc, stride_vsg, QUANT_GROUP, HEAD_DIM, BLOCK_D,
                VALUE_BITS)
    tl.store(length_ptr + row, length + 1)


# -- launchers ----------------------------------------------------------------------------------

def _codes_ok(q: Quantized, b: int, h: int, head_dim: int, bits: int) -> bool:
    return (q.codes.dtype == torch.uint8 and q.scale.dtype == SCALE_DTYPE
            and q.zero.dtype == SCALE_DTYPE and q.scale.shape == q.zero.shape
            and q.scale.stride() == q.zero.stride() and q.codes.dim() == 4
            and tuple(q.codes.shape[:2]) == (b, h) and q.scale.dim() == 4
            and tuple(q.scale.shape[:2]) == (b, h) and bits in CODE_BITS
            and q.codes.shape[3] == -(-head_dim * bits // 8))


def unsupported_quantized_attention(q: Tensor, keys: Quantized, values: Quantized,
                                    q_length: Tensor, k_fp: Tensor, v_fp: Tensor,
                                    fp_bias: Tensor | None, fp_length: Tensor | None,
                                    key_bits: int, value_bits: int, group: int) -> str | None:
    """Why the kernel does not serve this call (the reference does, and raises on bad
    arguments), or None when it does."""
    if q.dim() != 4 or k_fp.dim() != 4 or v_fp.dim() != 4 or q.shape[2] != 1:
        return f"q {tuple(q.shape)}: the kernel serves decode, q [B, Hq, 1, D]"
    b, hq, _, d = q.shape
    hkv, n_codes = k_fp.shape[1], keys.codes.shape[2] if keys.codes.dim() == 4 else -1
    if q.dtype not in KV_DTYPES or k_fp.dtype != q.dtype or v_fp.dtype != q.dtype:
        return f"dtypes q {q.dtype}, k_fp {k_fp.dtype}, v_fp {v_fp.dtype}"
    if k_fp.shape != v_fp.shape or tuple(k_fp.shape[::3]) != (b, d) or hkv == 0 or hq % hkv:
        return f"k_fp {tuple(k_fp.shape)} / v_fp {tuple(v_fp.shape)} against q {tuple(q.shape)}"
    if d > MAX_HEAD_DIM or hq // hkv > MAX_GROUP or b == 0 or group < 1:
        return f"head dim {d} / query group {hq // hkv} / batch {b} / quantization group {group}"
    if not (_codes_ok(keys, b, hkv, d, key_bits) and _codes_ok(values, b, hkv, d, value_bits)):
        return "codes, scales or zeros of another layout"
    if (keys.scale.shape[2:] != (-(-n_codes // group), d)
            or values.codes.shape[2] != n_codes
            or values.scale.shape[2:] != (n_codes, -(-d // group))):
        return "scales of another shape"
    if n_codes == 0 or k_fp.shape[2] == 0:
        return "an empty part (no code slots or no full-precision slots)"
    if (fp_bias is None) == (fp_length is None):
        return "not exactly one of fp_bias, fp_length"
    if fp_bias is not None and (fp_bias.dtype not in BIAS_DTYPES
                                or tuple(fp_bias.shape) != tuple(k_fp.shape[:3])):
        return f"fp_bias {fp_bias.dtype} {tuple(fp_bias.shape)}"
    for name, length in (("q_length", q_length), ("fp_length", fp_length)):
        if length is not None and (length.dtype != torch.int64 or tuple(length.shape) != (b,)):
            return f"{name} {length.dtype} {tuple(length.shape)}"
    tensors = (q, keys.codes, keys.scale, values.codes, values.scale, q_length, k_fp, v_fp,
               fp_bias, fp_length)
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        return f"tensors on several devices {sorted(map(str, devices))}"
    return None


def quantized_attention_config(dtype: torch.dtype, gqa: int, head_dim: int,
                               block_n: int | None = None) -> dict:
    """``triton_kernels.attention_config`` with half its slot tile by default (``4096 //
    BLOCK_D`` slots, 16 to 64): the dequantized K/V tiles and their scales and zeros live in
    registers next to the accumulator, and at head dim 128 the full tile of 64 slots takes all
    255 registers of a thread (sm_90 compile), 32 slots about 160. Untuned on hardware."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    return attention_config(dtype, gqa, head_dim, block_n or max(16, min(64, 4096 // block_d)))


def quantized_decode_attention(q: Tensor, keys: Quantized, values: Quantized, q_length: Tensor,
                               k_fp: Tensor, v_fp: Tensor, fp_bias: Tensor | None,
                               fp_length: Tensor | None, key_bits: int, value_bits: int,
                               group: int, scale: float, *, num_splits: int | None = None,
                               block_n: int | None = None, out: Tensor | None = None,
                               partials: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """``quantized_attention`` by the kernels (``num_splits``, ``block_n``, ``out`` and
    ``partials`` as in ``triton_kernels.decode_attention``; the splits cut the code slots)."""
    b, hq, _, d = q.shape
    hkv, n_codes, n_fp = k_fp.shape[1], keys.codes.shape[2], k_fp.shape[2]
    gqa = hq // hkv
    config = quantized_attention_config(q.dtype, gqa, d, block_n)
    block_n = config["BLOCK_N"]
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    splits = num_splits or plan_splits(b * hkv, n_codes, sm_count(q.device))
    split_slots = triton.cdiv(triton.cdiv(max(n_codes, 1), splits), block_n) * block_n
    splits = max(1, triton.cdiv(n_codes, split_slots))
    if splits > 1 and partials is None:
        partials = split_workspace(b * hkv, splits, gqa, d, q.device)
    part_m, part_l, part_acc = partials if splits > 1 else (out, out, out)
    config.update(KEY_BITS=key_bits, VALUE_BITS=value_bits, QUANT_GROUP=group,
                  HAS_BIAS=fp_bias is not None, HAS_FP_LENGTH=fp_length is not None,
                  SPLIT=splits > 1)
    _quantized_decode_kernel[(b * hkv, splits)](
        q, keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero, q_length,
        k_fp, v_fp, fp_bias, fp_length, out, part_m, part_l, part_acc, scale, n_codes, n_fp,
        hkv, split_slots, splits, q.stride(0), q.stride(1), q.stride(3), *keys.codes.stride(),
        *keys.scale.stride(), *values.codes.stride(), *values.scale.stride(), *k_fp.stride(),
        *v_fp.stride(), *_strides(fp_bias, 3), out.stride(0), out.stride(1), out.stride(3),
        **config)
    if splits > 1:
        _combine_splits_kernel[(b * hq,)](
            part_m, part_l, part_acc, q_length, out, n_codes, hkv, split_slots, splits,
            out.stride(0), out.stride(1), out.stride(3), HAS_LENGTH=False,
            **combine_config(gqa, d, splits))
    return out


def append_config(group: int, head_dim: int) -> dict:
    """Compile-time constants and launch options of the append: no FMA contraction (the
    quantization is the reference's arithmetic, rounding for rounding)."""
    block_d = max(16, triton.next_power_of_2(head_dim), group)
    return dict(HEAD_DIM=head_dim, QUANT_GROUP=group, BLOCK_D=block_d,
                num_warps=max(1, min(8, group * block_d // 512)), enable_fp_fusion=False)


def unsupported_quantized_append(keys: Quantized, values: Quantized, k_res: Tensor,
                                 v_res: Tensor, length: Tensor, k_new: Tensor, v_new: Tensor,
                                 key_bits: int, value_bits: int, group: int) -> str | None:
    """Why the append kernel does not serve this call (the reference does), or None."""
    if k_res.dim() != 4 or v_res.shape != k_res.shape or k_new.dim() != 4 or v_new.dim() != 4:
        return "k_res / v_res / k_new / v_new of other ranks or shapes"
    b, h, ring, d = k_res.shape
    if k_res.dtype not in KV_DTYPES or v_res.dtype != k_res.dtype:
        return f"ring dtypes {k_res.dtype} / {v_res.dtype}"
    if k_new.dtype not in KV_DTYPES or v_new.dtype not in KV_DTYPES:
        return f"new token dtypes {k_new.dtype} / {v_new.dtype}"
    if tuple(k_new.shape) != (b, h, 1, d) or tuple(v_new.shape) != (b, h, 1, d):
        return f"new tokens {tuple(k_new.shape)} / {tuple(v_new.shape)}, not [B, H, 1, D]"
    if group < 2 or group & (group - 1) or ring != group:
        return f"quantization group {group} (a power of two, the ring's {ring} slots)"
    if d > MAX_HEAD_DIM or group * append_config(group, d)["BLOCK_D"] > MAX_RING_ELEMENTS:
        return f"head dim {d} / group {group}: ring tile too large"
    if not (_codes_ok(keys, b, h, d, key_bits) and _codes_ok(values, b, h, d, value_bits)):
        return "codes, scales or zeros of another layout"
    n_groups, tokens = keys.scale.shape[2], keys.codes.shape[2]
    if n_groups == 0:
        return "no body (max_context below one group): nothing to flush into"
    if (tokens != n_groups * group or values.codes.shape[2] != tokens
            or keys.scale.shape[3] != d or values.scale.shape[2:] != (tokens, -(-d // group))):
        return "body of another shape"
    if length.dtype != torch.int64 or tuple(length.shape) != (b,):
        return f"length {length.dtype} {tuple(length.shape)}"
    tensors = (keys.codes, keys.scale, values.codes, values.scale, k_res, v_res, length, k_new,
               v_new)
    if len({t.device for t in tensors}) != 1:
        return "tensors on several devices"
    return None


def quantized_append(keys: Quantized, values: Quantized, k_res: Tensor, v_res: Tensor,
                     length: Tensor, k_new: Tensor, v_new: Tensor, key_bits: int,
                     value_bits: int, group: int) -> None:
    """``quantized_append`` by one kernel launch (one program per batch row), in place."""
    b, h, _, d = k_res.shape
    _quantized_append_kernel[(b,)](
        keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero, k_res, v_res,
        length, k_new, v_new, h, keys.scale.shape[2], *keys.codes.stride(), *keys.scale.stride(),
        *values.codes.stride(), *values.scale.stride(), *k_res.stride(), *v_res.stride(),
        k_new.stride(0), k_new.stride(1), k_new.stride(3), v_new.stride(0), v_new.stride(1),
        v_new.stride(3), KEY_BITS=key_bits, VALUE_BITS=value_bits,
        **append_config(group, d))
