"""Reference bodies of the quantized cache's ``kvcompile`` ONNX ops, in standard ops (opset 24).

They compute what ``runtime/quant.py`` (KIVI's layout) and ``runtime/quant_ops.py`` compute,
in plain arithmetic: ``code = clip(round((x - zero) / scale), 0, 2^bits - 1)`` with
``zero = fp16(min)``, ``scale = fp16((max - zero) / (2^bits - 1))``, ``x̂ = code * scale +
zero`` in float32; codes packed ``8 / bits`` per ``uint8``, low bits first (``Mul`` by powers
of two and ``ReduceSum`` to pack, ``BitShift`` and ``BitwiseAnd`` to unpack). Not
``DequantizeLinear``: its zero point is an integer of the code's type (``(q - zp) * s``),
KIVI's is a float16 minimum, and ONNX has no type for codes packed two or four per byte in
this order. Bits and group are node attributes the bodies read, so one body serves every
storage:

=====================  ==========  ================================================
op                     overload    inputs
=====================  ==========  ================================================
QuantizeKV             ``""``      k, v, length           (prefill: body / selected)
QuantizedAppend        ``""``      6 codes, k_res, v_res, length, k_new, v_new
QuantizedAttention     ``length``  q, 6 codes, q_length, k_fp, v_fp, "", fp_length
QuantizedAttention     ``bias``    q, 6 codes, q_length, k_fp, v_fp, fp_bias
=====================  ==========  ================================================

"6 codes" are ``key_codes, key_scale, key_zero, value_codes, value_scale, value_zero`` in the
shapes of ``runtime/quant.py``. ``QuantizedAppend`` writes each state tensor with one
``ScatterElements`` after every read of it, so binding its inputs as its outputs updates the
cache in place, as ``BudgetedCacheUpdate`` does.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx_ir as ir

from .functions import _attend, _Body

QUANTIZE = "QuantizeKV"
APPEND = "QuantizedAppend"
ATTENTION = "QuantizedAttention"
OPS = (QUANTIZE, APPEND, ATTENTION)
ATTENTION_OVERLOADS = ("length", "bias")
CODE_NAMES = ("key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero")

_FP16_MAX = float(np.finfo(np.float16).max)
_FLOAT, _F16, _U8 = ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.UINT8


class _Bits(NamedTuple):
    """What one bit width needs at run time (from a node attribute)."""

    top: ir.Value  # float32 scalar 2^bits - 1
    top_u8: ir.Value  # the same as uint8
    shifts: ir.Value  # uint8 [8 / bits]: bits * i
    weights: ir.Value  # float32 [8 / bits]: 2^(bits * i)


def _bits(b: _Body, name: str) -> _Bits:
    bits = b.attr(name)
    two = b.const(2.0, np.float32)
    top = b.Sub(b.Pow(two, b.Cast(bits, to=_FLOAT)), b.const(1.0, np.float32))
    shifts = b.Mul(b.Range(b.const(0), b.Div(b.const(8), bits), b.const(1)), bits)
    return _Bits(top, b.Cast(top, to=_U8), b.Cast(shifts, to=_U8),
                 b.Pow(two, b.Cast(shifts, to=_FLOAT)))


def _affine(b: _Body, x: ir.Value, axis: int, bits: _Bits) -> tuple[ir.Value, ...]:
    """Float codes, float16 scale and float16 zero of ``x`` reduced over ``axis`` (kept),
    step by step as ``quant._affine``."""
    x = b.Clip(x, b.const(-_FP16_MAX, np.float32), b.const(_FP16_MAX, np.float32))
    axes = b.const([axis])
    zero16 = b.Cast(b.ReduceMin(x, axes, keepdims=1), to=_F16)
    zero = b.Cast(zero16, to=_FLOAT)
    scale16 = b.Cast(b.Min(b.Div(b.Sub(b.ReduceMax(x, axes, keepdims=1), zero), bits.top),
                           b.const(_FP16_MAX, np.float32)), to=_F16)
    scale = b.Cast(scale16, to=_FLOAT)
    safe = b.Where(b.Equal(scale, b.const(0.0, np.float32)), b.const(1.0, np.float32), scale)
    codes = b.Clip(b.Round(b.Div(b.Sub(x, zero), safe)), b.const(0.0, np.float32), bits.top)
    return codes, scale16, zero16


def _pack(b: _Body, codes: ir.Value, bits: _Bits) -> ir.Value:
    """Float codes ``[B, H, N, D]`` -> ``uint8 [B, H, N, ceil(D * bits / 8)]``."""
    per_byte = b.Shape(bits.weights)
    pad = b.Mod(b.Sub(per_byte, b.Mod(b.dim(codes, 3), per_byte)), per_byte)
    padded = b.Pad(codes, b.Concat(b.const([0] * 7), pad, axis=0))
    n_bytes = b.Div(b.Add(b.dim(codes, 3), pad), per_byte)
    grouped = b.Reshape(padded, b.Concat(b.Shape(codes, end=3), n_bytes, per_byte, axis=0))
    return b.Cast(b.ReduceSum(b.Mul(grouped, bits.weights), b.const([-1]), keepdims=0), to=_U8)


def _unpack(b: _Body, packed: ir.Value, bits: _Bits, head_dim: ir.Value) -> ir.Value:
    """``uint8 [B, H, N, bytes]`` -> float codes ``[B, H, N, D]``."""
    parts = b.BitwiseAnd(b.BitShift(b.Unsqueeze(packed, b.const([-1])), bits.shifts,
                                    direction="RIGHT"), bits.top_u8)
    codes = b.Mul(b.dim(packed, 3), b.Shape(bits.shifts))  # no -1: a row may hold no codes
    flat = b.Reshape(parts, b.Concat(b.Shape(packed, end=3), codes, axis=0))
    return b.Cast(b.Slice(flat, b.const([0]), head_dim, b.const([3])), to=_FLOAT)


def _row_mask(b: _Body, positions: ir.Value, length: ir.Value) -> ir.Value:
    """``[B, 1, N, 1]``: position ``positions[j]`` is below row ``b``'s ``length[b]``."""
    inside = b.Less(b.Unsqueeze(positions, b.const([0])), b.Unsqueeze(length, b.const([1])))
    return b.Reshape(inside, b.const([0, 1, -1, 1]))


def _masked(b: _Body, mask: ir.Value, value: ir.Value, dtype: np.dtype) -> ir.Value:
    return b.Where(mask, value, b.const(0, dtype))


def _quantize_keys(b: _Body, x: ir.Value, length: ir.Value | None, bits: _Bits,
                   group: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """``quant.quantize_keys`` of ``x [B, H, N, D]`` (float32) per channel over groups of
    ``group`` tokens. ``length [B]``: row ``b`` holds its first ``length[b]`` tokens, the last
    partial group ranges over its own tokens, and the slots after them get zero codes and
    groups after them zero scales (an empty buffer's); ``None``: ``N`` is whole groups."""
    batch, heads, n, d = (b.dim(x, axis) for axis in range(4))
    one = b.const(1)
    groups = b.Div(b.Add(n, b.Sub(group, one)), group)
    padded = b.Mul(groups, group)
    if length is not None:  # tokens past a row's length repeat its last one
        last = b.Max(b.Sub(length, one), b.const(0))
        source = b.Min(b.Unsqueeze(b.Range(b.const(0), b.scalar(padded), one), b.const([0])),
                       b.Unsqueeze(last, b.const([1])))  # [B, P]
        index = b.Expand(b.Reshape(source, b.const([0, 1, -1, 1])),
                         b.Concat(batch, heads, padded, d, axis=0))
        x = b.GatherElements(x, index, axis=2)
    codes, scale, zero = _affine(b, b.Reshape(x, b.Concat(batch, heads, groups, b.vec(group), d,
                                                          axis=0)), 3, bits)
    codes = b.Slice(b.Reshape(codes, b.Concat(batch, heads, padded, d, axis=0)), b.const([0]),
                    n, b.const([2]))
    scale, zero = (b.Squeeze(t, b.const([3])) for t in (scale, zero))
    if length is not None:
        codes = _masked(b, _row_mask(b, b.Range(b.const(0), b.scalar(n), one), length), codes,
                        np.float32)
        starts = b.Mul(b.Range(b.const(0), b.scalar(groups), one), group)
        in_group = _row_mask(b, starts, length)
        scale, zero = (_masked(b, in_group, t, np.float16) for t in (scale, zero))
    return _pack(b, codes, bits), scale, zero


def _quantize_values(b: _Body, x: ir.Value, length: ir.Value | None, bits: _Bits,
                     group: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """``quant.quantize_values`` of ``x [B, H, N, D]`` per token over groups of ``group``
    channels (a last partial group ranges over its own channels); ``length`` as for keys."""
    batch, heads, n, d = (b.dim(x, axis) for axis in range(4))
    one = b.const(1)
    groups = b.Div(b.Add(d, b.Sub(group, one)), group)
    padded = b.Mul(groups, group)
    channels = b.Min(b.Range(b.const(0), b.scalar(padded), one), b.scalar(b.Sub(d, one)))
    x = b.Gather(x, channels, axis=3)
    codes, scale, zero = _affine(b, b.Reshape(x, b.Concat(batch, heads, n, groups, b.vec(group),
                                                          axis=0)), 4, bits)
    codes = b.Slice(b.Reshape(codes, b.Concat(batch, heads, n, padded, axis=0)), b.const([0]),
                    d, b.const([3]))
    scale, zero = (b.Squeeze(t, b.const([4])) for t in (scale, zero))
    if length is not None:
        mask = _row_mask(b, b.Range(b.const(0), b.scalar(n), one), length)
        codes = _masked(b, mask, codes, np.float32)
        scale, zero = (_masked(b, mask, t, np.float16) for t in (scale, zero))
    return _pack(b, codes, bits), scale, zero


def _dequantize(b: _Body, codes: ir.Value, scale: ir.Value, zero: ir.Value, bits: _Bits,
                group: ir.Value, head_dim: ir.Value, axis: int) -> ir.Value:
    """``code * scale + zero`` in float32, each code's scale gathered from its group along
    ``axis`` (2: keys, by token; 3: values, by channel)."""
    x = _unpack(b, codes, bits, head_dim)
    size = b.dim(x, axis)
    index = b.Div(b.Range(b.const(0), b.scalar(size), b.const(1)), group)
    per_code = [b.Cast(b.Gather(t, index, axis=axis), to=_FLOAT) for t in (scale, zero)]
    return b.Add(b.Mul(x, per_code[0]), per_code[1])


def quantize_kv() -> ir.Function:
    """``kvcompile::QuantizeKV``: keys and values ``[B, H, N, D]`` of which row ``b`` holds
    its first ``length[b]`` tokens -> the six code tensors of ``N`` slots (the rest zero), as
    ``quant.quantize_keys`` / ``quantize_values`` of the held tokens leave them in an empty
    buffer. Prefill: the full heads' whole token groups, the budgeted heads' selected slots."""
    b = _Body(["k", "v", "length"])
    k, v, length = b.inputs
    group = b.attr("group")
    outputs = [*_quantize_keys(b, k, length, _bits(b, "key_bits"), group),
               *_quantize_values(b, v, length, _bits(b, "value_bits"), group)]
    return b.function(QUANTIZE, "", outputs, ["key_bits", "value_bits", "group"],
                      output_names=CODE_NAMES)


def quantized_append() -> ir.Function:
    """``kvcompile::QuantizedAppend``: ``quant_ops.quantized_append`` in standard ops.

    Row ``b``'s token at position ``length[b]`` goes to residual slot ``length % group``;
    when that fills the ring, the ring is quantized into body group ``length // group``
    (codes, the keys' scales of the group, the values' of its tokens); other rows' body is
    rewritten with what it held. Outputs: the six code tensors, then ``k_res, v_res``.
    """
    b = _Body([*CODE_NAMES, "k_res", "v_res", "length", "k_new", "v_new"])
    *codes, k_res, v_res, length, k_new, v_new = b.inputs
    group = b.attr("group")
    one = b.const(1)
    slot = b.Mod(length, group)
    index = b.Expand(b.Reshape(slot, b.const([-1, 1, 1, 1])), b.Shape(k_new))
    k_res = b.ScatterElements(k_res, index, k_new, axis=2)
    v_res = b.ScatterElements(v_res, index, v_new, axis=2)
    flush = b.Reshape(b.Equal(slot, b.Sub(group, one)), b.const([-1, 1, 1, 1]))
    quantized = [*_quantize_keys(b, k_res, None, _bits(b, "key_bits"), group),
                 *_quantize_values(b, v_res, None, _bits(b, "value_bits"), group)]
    target = b.Min(b.Div(length, group), b.Sub(b.scalar(b.dim(codes[1], 2)), one))  # [B]
    target_group = b.Unsqueeze(target, b.const([1]))  # [B, 1]
    tokens = b.Add(b.Mul(target_group, group),
                   b.Unsqueeze(b.Range(b.const(0), group, one), b.const([0])))  # [B, G]
    outputs = []
    for name, state, new in zip(CODE_NAMES, codes, quantized, strict=True):
        rows = target_group if name in ("key_scale", "key_zero") else tokens
        where = b.Expand(b.Reshape(rows, b.const([0, 1, -1, 1])), b.Shape(new))
        held = b.GatherElements(state, where, axis=2)
        outputs.append(b.ScatterElements(state, where, b.Where(flush, new, held), axis=2))
    return b.function(APPEND, "", [*outputs, k_res, v_res], ["key_bits", "value_bits", "group"],
                      output_names=(*(f"{name}_out" for name in CODE_NAMES), "k_res_out",
                                    "v_res_out"))


def quantized_attention(overload: str) -> ir.Function:
    """``kvcompile::QuantizedAttention``: ``quant_ops.quantized_attention`` in standard ops.

    Decode attention of ``q [B, Hq, 1, D]`` over the first ``q_length[b]`` quantized slots
    (cut to the longest row's, so the cost follows the filled part) and the full-precision
    ``k_fp, v_fp [B, Hkv, S_f, D]``, masked by ``fp_bias [B, Hkv, S_f]`` (overload ``bias``)
    or by its first ``fp_length[b]`` slots (``length``); one softmax over both.
    """
    if overload not in ATTENTION_OVERLOADS:
        raise ValueError(f"unknown {ATTENTION} overload {overload!r}")
    b = _Body(["q", *CODE_NAMES, "q_length", "k_fp", "v_fp", "fp_bias", "fp_length"])
    q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, q_length, k_fp, v_fp, fp_bias, \
        fp_length = b.inputs
    group, zero, one = b.attr("group"), b.const(0), b.const(1)
    head_dim, batch, heads = b.dim(k_fp, 3), b.dim(k_fp, 0), b.dim(k_fp, 1)
    held = b.ReduceMax(q_length, b.const([0]), keepdims=1)
    axis = b.const([2])
    keys = _dequantize(b, b.Slice(k_codes, b.const([0]), held, axis), k_scale, k_zero,
                       _bits(b, "key_bits"), group, head_dim, 2)
    values = _dequantize(b, b.Slice(v_codes, b.const([0]), held, axis),
                         b.Slice(v_scale, b.const([0]), held, axis),
                         b.Slice(v_zero, b.const([0]), held, axis),
                         _bits(b, "value_bits"), group, head_dim, 3)

    def length_bias(length: ir.Value, slots: ir.Value) -> ir.Value:
        inside = b.Less(b.Unsqueeze(b.Range(zero, b.scalar(slots), one), b.const([0])),
                        b.Unsqueeze(length, b.const([1])))  # [B, S]
        bias = b.Where(inside, b.const(0.0, np.float32), b.const(float("-inf"), np.float32))
        return b.Expand(b.Unsqueeze(bias, b.const([1])), b.Concat(batch, heads, slots, axis=0))

    if overload == "length":
        fp_bias = length_bias(fp_length, b.dim(k_fp, 2))
    bias = b.Concat(length_bias(q_length, held), fp_bias, axis=2)
    k = b.Concat(keys, k_fp, axis=2)
    v = b.Concat(values, v_fp, axis=2)
    rule = (zero, zero, b.attr("scale", ir.AttributeType.FLOAT))
    out = _attend(b, q, k, v, bias, b.Expand(b.dim(k, 2), b.dim(q, 0)), b.dim(q, 2), zero, zero,
                  rule)
    return b.function(ATTENTION, overload, [out], ["key_bits", "value_bits", "group", "scale"],
                      output_names=("out",))


def function_for(op_type: str, overload: str) -> ir.Function:
    """The reference body of one quantized ``(kvcompile op, overload)``."""
    if op_type == QUANTIZE and overload == "":
        return quantize_kv()
    if op_type == APPEND and overload == "":
        return quantized_append()
    if op_type == ATTENTION:
        return quantized_attention(overload)
    raise ValueError(f"no reference body for kvcompile::{op_type} overload {overload!r}")
