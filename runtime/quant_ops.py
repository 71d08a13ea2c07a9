"""The quantized cache's two ``kvcompile`` custom ops: decode attention over codes plus a
full-precision part, and the full heads' append with its residual-ring flush.

Plain-torch references, like :mod:`kvcompile.runtime.ops` (whose conventions they follow:
``bias`` float32 per slot, int64 ``[B]`` lengths, softmax in float32, output in the query
dtype). They define what the Triton kernels (:mod:`kvcompile.runtime.triton_kernels`) and the
ONNX function bodies compute; ``tests/test_quant_ops.py`` checks them against a float64
recomputation.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .ops import _budgeted_attention_ref, _plain_eager_cpu, host_reads_free
from .quant import Quantized, dequantize_keys, dequantize_values, quantize_keys, quantize_values

__all__ = ["DequantMemo", "quantized_attention", "quantized_append"]


def _visible_bias(length: Tensor, slots: int, dtype: torch.dtype) -> Tensor:
    """``[B, slots]``: 0 for the first ``length[b]`` slots of row ``b``, ``-inf`` after."""
    inside = torch.arange(slots, device=length.device)[None, :] < length[:, None]
    return torch.where(inside, 0.0, float("-inf")).to(dtype)


def _dequantized(k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, v_codes: Tensor,
                 v_scale: Tensor, v_zero: Tensor, q_length: Tensor, key_bits: int,
                 value_bits: int, group: int, head_dim: int, k_dtype: torch.dtype,
                 v_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The codes as keys and values in the full-precision part's dtypes (computed in float32);
    on the CPU only the codes some row holds."""
    if host_reads_free(q_length):
        n = int(q_length.max()) if q_length.numel() else 0
        if n < k_codes.shape[2]:
            groups = -(-n // group)
            k_codes, v_codes = k_codes[:, :, :n], v_codes[:, :, :n]
            v_scale, v_zero = v_scale[:, :, :n], v_zero[:, :, :n]
            k_scale, k_zero = k_scale[:, :, :groups], k_zero[:, :, :groups]
    keys = dequantize_keys(Quantized(k_codes, k_scale, k_zero), key_bits, group, head_dim, k_dtype)
    values = dequantize_values(Quantized(v_codes, v_scale, v_zero), value_bits, group, head_dim,
                               v_dtype)
    return keys, values


def _check_decode(q: Tensor, fp_bias: Tensor | None, fp_length: Tensor | None) -> None:
    if q.shape[2] != 1:
        raise ValueError(f"quantized attention is a decode op (one query per row), got T={q.shape[2]}")
    if (fp_bias is None) == (fp_length is None):
        raise ValueError("the full-precision part is masked by exactly one of fp_bias, fp_length")


def _attend_dequantized(q: Tensor, keys: Tensor, values: Tensor, q_length: Tensor, k_fp: Tensor,
                        v_fp: Tensor, fp_bias: Tensor | None, fp_length: Tensor | None,
                        scale: float) -> Tensor:
    """One softmax over the dequantized codes (their first ``q_length[b]``) and the
    full-precision part."""
    b = q.shape[0]
    hkv, n_codes, n_fp = k_fp.shape[1], keys.shape[2], k_fp.shape[2]
    bias_dtype = fp_bias.dtype if fp_bias is not None else torch.promote_types(k_fp.dtype,
                                                                              torch.float32)
    code_bias = _visible_bias(q_length, n_codes, bias_dtype)[:, None].expand(b, hkv, n_codes)
    if fp_bias is None:
        assert fp_length is not None
        fp_bias = _visible_bias(fp_length, n_fp, bias_dtype)[:, None].expand(b, hkv, n_fp)
    return _budgeted_attention_ref(q, torch.cat([keys, k_fp], dim=2),
                                   torch.cat([values, v_fp], dim=2),
                                   torch.cat([code_bias, fp_bias], dim=2), None, False, 0, scale)


def _quantized_attention_ref(q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor,
                             v_codes: Tensor, v_scale: Tensor, v_zero: Tensor, q_length: Tensor,
                             k_fp: Tensor, v_fp: Tensor, fp_bias: Tensor | None,
                             fp_length: Tensor | None, key_bits: int, value_bits: int,
                             group: int, scale: float, memo: DequantMemo | None = None) -> Tensor:
    """Dequantize (or take an earlier step's values from ``memo``), concatenate with the
    full-precision part, attend (the ops' reference)."""
    _check_decode(q, fp_bias, fp_length)

    def decode() -> tuple[Tensor, Tensor]:
        return _dequantized(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, q_length,
                            key_bits, value_bits, group, q.shape[-1], k_fp.dtype, v_fp.dtype)

    keys, values = decode() if memo is None else memo.get(q_length, decode)
    return _attend_dequantized(q, keys, values, q_length, k_fp, v_fp, fp_bias, fp_length, scale)


class DequantMemo:
    """Dequantized codes kept across the decode steps of one multi-token extend.

    A group's codes change only when a row's count of them does (the full heads' ring
    flushing a group; the budgeted heads' selected slots never change after prefill), so the
    values one step dequantized serve every later step with the same counts: ``T`` steps
    dequantize once per flush instead of ``T`` times. Same values, same attention: the
    outputs equal ``T`` separate steps bit for bit. Plain CPU tensors only (elsewhere the op
    runs, and the kernels dequantize in registers).
    """

    def __init__(self) -> None:
        self._counts: tuple[int, ...] | None = None
        self._values: tuple[Tensor, Tensor] | None = None

    def get(self, q_length: Tensor, decode: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        counts = tuple(q_length.tolist())
        if self._values is None or counts != self._counts:
            self._counts, self._values = counts, decode()
        return self._values


@torch.library.custom_op("kvcompile::quantized_attention", mutates_args=())
def _quantized_attention_op(q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor,
                            v_codes: Tensor, v_scale: Tensor, v_zero: Tensor, q_length: Tensor,
                            k_fp: Tensor, v_fp: Tensor, fp_bias: Tensor | None,
                            fp_length: Tensor | None, key_bits: int, value_bits: int,
                            group: int, scale: float) -> Tensor:
    return _quantized_attention_ref(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                                    q_length, k_fp, v_fp, fp_bias, fp_length, key_bits,
                                    value_bits, group, scale)


@_quantized_attention_op.register_fake
def _quantized_attention_fake(q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor,
                              v_codes: Tensor, v_scale: Tensor, v_zero: Tensor,
                              q_length: Tensor, k_fp: Tensor, v_fp: Tensor,
                              fp_bias: Tensor | None, fp_length: Tensor | None, key_bits: int,
                              value_bits: int, group: int, scale: float) -> Tensor:
    return q.new_empty(q.shape)


def quantized_attention(q: Tensor, keys: Quantized, values: Quantized, q_length: Tensor,
                        k_fp: Tensor, v_fp: Tensor, *, fp_bias: Tensor | None = None,
                        fp_length: Tensor | None = None, key_bits: int, value_bits: int,
                        group: int, scale: float | None = None,
                        memo: DequantMemo | None = None) -> Tensor:
    """Decode attention of ``q [B, Hq, 1, D]`` over a head group stored in two parts.

    * quantized: ``keys`` / ``values`` in the layout of :mod:`kvcompile.runtime.quant`,
      ``S_q`` token slots of which row ``b`` holds the first ``q_length[b]`` (int64 ``[B]``);
    * full precision: ``k_fp, v_fp [B, Hkv, S_f, D]``, masked either by a per-slot logit
      ``fp_bias [B, Hkv, S_f]`` (budgeted heads: 0, ``ln n``, ``-inf``) or by a length
      ``fp_length [B]`` (full heads' residual ring: its first ``fp_length[b]`` slots).

    Every visible slot of both parts is a key of the one softmax (the query is the newest
    token, so nothing is causal-masked); the codes are dequantized in float32 and rounded to
    ``k_fp``'s dtype, as the full-precision keys are stored. GQA as in ``budgeted_attention``.
    ``memo``: reuse the dequantized codes of an earlier step of the same extend
    (:class:`DequantMemo`).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    args = (q, keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero,
            q_length, k_fp, v_fp, fp_bias, fp_length, int(key_bits), int(value_bits), int(group),
            float(scale))
    if _plain_eager_cpu(*(a for a in args if isinstance(a, Tensor))):
        return _quantized_attention_ref(*args, memo=memo)
    return _quantized_attention_op(*args)


def _quantized_append_ref(k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, v_codes: Tensor,
                          v_scale: Tensor, v_zero: Tensor, k_res: Tensor, v_res: Tensor,
                          length: Tensor, k_new: Tensor, v_new: Tensor, key_bits: int,
                          value_bits: int, group: int) -> None:
    """Vectorised over the batch, no host reads on a device; writes in place."""
    b = k_res.shape[0]
    rows = torch.arange(b, device=k_res.device)
    slot = torch.remainder(length, group)
    k_res[rows, :, slot] = k_new[:, :, 0].to(k_res.dtype)
    v_res[rows, :, slot] = v_new[:, :, 0].to(v_res.dtype)
    flush = slot == group - 1
    n_groups = k_scale.shape[2]
    if n_groups and not (host_reads_free(flush) and not bool(flush.any())):
        qk = quantize_keys(k_res, key_bits, group)
        qv = quantize_values(v_res, value_bits, group)
        target = torch.clamp(torch.div(length, group, rounding_mode="floor"), max=n_groups - 1)
        tokens = target[:, None] * group + torch.arange(group, device=length.device)  # [B, G]
        keep = flush[:, None, None]
        k_scale[rows, :, target] = torch.where(keep, qk.scale[:, :, 0], k_scale[rows, :, target])
        k_zero[rows, :, target] = torch.where(keep, qk.zero[:, :, 0], k_zero[rows, :, target])
        keep4 = flush[:, None, None, None]
        for dst, src in ((k_codes, qk.codes), (v_codes, qv.codes), (v_scale, qv.scale),
                         (v_zero, qv.zero)):
            old = dst[rows[:, None], :, tokens].transpose(1, 2)  # [B, H, G, ...]
            dst[rows[:, None], :, tokens] = torch.where(keep4, src, old).transpose(1, 2)
    length.add_(1)


@torch.library.custom_op(
    "kvcompile::quantized_append",
    mutates_args=("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_res",
                  "v_res", "length"),
)
def _quantized_append_op(k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, v_codes: Tensor,
                         v_scale: Tensor, v_zero: Tensor, k_res: Tensor, v_res: Tensor,
                         length: Tensor, k_new: Tensor, v_new: Tensor, key_bits: int,
                         value_bits: int, group: int) -> None:
    _quantized_append_ref(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res,
                          length, k_new, v_new, key_bits, value_bits, group)


@_quantized_append_op.register_fake
def _quantized_append_fake(k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, v_codes: Tensor,
                           v_scale: Tensor, v_zero: Tensor, k_res: Tensor, v_res: Tensor,
                           length: Tensor, k_new: Tensor, v_new: Tensor, key_bits: int,
                           value_bits: int, group: int) -> None:
    return None


def quantized_append(keys: Quantized, values: Quantized, k_res: Tensor, v_res: Tensor,
                     length: Tensor, k_new: Tensor, v_new: Tensor, *, key_bits: int,
                     value_bits: int, group: int) -> None:
    """Append one token per row to a quantized full-head group, in place.

    The token ``p = length[b]`` goes to residual slot ``p % group`` (full precision,
    ``k_res, v_res [B, H, group, D]``). When that fills the ring (``p % group == group - 1``),
    the ring is quantized as token group ``p // group`` of the body (``keys`` / ``values``:
    ``[B, H, n_groups * group, ...]`` codes, the keys' scales per group, the values' per
    token) and the ring starts over. ``length`` counts the row's tokens (body + residual).
    Rows flush independently; the caller keeps ``length`` below the body's capacity plus one
    group.
    """
    args = (keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero, k_res,
            v_res, length, k_new, v_new, int(key_bits), int(value_bits), int(group))
    if _plain_eager_cpu(*(a for a in args if isinstance(a, Tensor))):
        _quantized_append_ref(*args)
    else:
        _quantized_append_op(*args)
