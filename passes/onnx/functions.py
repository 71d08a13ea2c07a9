"""Reference bodies of the ``kvcompile`` ONNX ops, written in standard ops (opset 24).

Every ``kvcompile`` node of the artifact's graphs gets one of these as a model-local function,
so stock onnxruntime (nothing registered) inlines and runs it, and a kernel registered for
``(kvcompile, op)`` takes over instead. The bodies compute what the torch contract computes
(``runtime/ops.py``: ``budgeted_attention``, ``budgeted_cache_update``; ``runtime/cache.py``:
``selection_scores`` + ``compress_prefill``), and are generic in the layout: a node's
attributes (sinks, compensation, selected, window, causal, scale ...) are read by the body
as reference attributes, so one body serves every layer. Which optional inputs a node has is
the function's *overload*:

=====================  ==========  ===============================================
op                     overload    inputs
=====================  ==========  ===============================================
BudgetedAttention      ``plain``   q, k, v                       (prefill: exact)
BudgetedAttention      ``bias``    q, k, v, bias                 (budgeted heads)
BudgetedAttention      ``length``  q, k, v, "", kv_length        (full heads)
BudgetedCacheUpdate    ``""``      k_buf, v_buf, bias, counters, k_new, v_new
CompressPrefill        ``attention`` / ``key_norm``  q, k, v (selection rule)
=====================  ==========  ===============================================

The quantized groups' ops (``QuantizeKV``, ``QuantizedAppend``, ``QuantizedAttention``) have
their bodies in :mod:`.quant_functions`; :func:`function_for` serves both.

The cache update writes each buffer with a single ``ScatterElements`` of at most three slots
per row (the new token, the folded compensation mean, the token moved to a selected slot)
after every read of that buffer, so binding one buffer as the node's input and output updates
it in place (onnxruntime skips the input copy when the two pointers are equal).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from kvcompile.plan import SELECTIONS
from kvcompile.runtime.onnx_io import DOMAIN, OPSET
from kvcompile.runtime.ops import QUERY_CHUNK

ATTENTION = "BudgetedAttention"
CACHE_UPDATE = "BudgetedCacheUpdate"
COMPRESS_PREFILL = "CompressPrefill"
ATTENTION_OVERLOADS = ("plain", "bias", "length")
SELECTION_OVERLOADS = SELECTIONS  # the plan's selection rule

_FLOAT_MIN = float(np.finfo(np.float32).min)
_FLOAT_TINY = float(np.finfo(np.float32).tiny)
_FLOAT, _DOUBLE, _INT64 = ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.INT64


class _Body:
    """Builds one function body with onnx-ir: ``b.MatMul(x, y)``, ``b.TopK(x, k, outputs=2)``."""

    def __init__(self, inputs: Sequence[str]) -> None:
        self.tape = ir.tape.Tape()
        self.inputs = [ir.Value(name=name) for name in inputs]

    def __getattr__(self, op_type: str):
        if not op_type[:1].isupper():
            raise AttributeError(op_type)

        def node(*inputs: ir.Value | None, outputs: int = 1, **attributes):
            if outputs == 1:
                return self.tape.op(op_type, list(inputs), attributes=attributes or None)
            return self.tape.op_multi_out(op_type, list(inputs), attributes=attributes or None,
                                          num_outputs=outputs)

        return node

    def attr(self, name: str, kind: ir.AttributeType = ir.AttributeType.INT) -> ir.Value:
        """The node's attribute ``name`` as a scalar tensor (a reference attribute)."""
        field = "value_int" if kind == ir.AttributeType.INT else "value_float"
        return self.tape.op("Constant", [], attributes={field: ir.RefAttr(field, name, kind)})

    def const(self, value, dtype=np.int64) -> ir.Value:
        return self.tape.op("Constant", [], attributes={"value": ir.tensor(np.array(value, dtype))})

    def dim(self, value: ir.Value, axis: int) -> ir.Value:
        """``value.shape[axis]`` as a 1-element int64 tensor."""
        return self.Shape(value, start=axis, end=axis + 1)

    def scalar(self, vector: ir.Value) -> ir.Value:
        return self.Squeeze(vector, self.const([0]))

    def vec(self, scalar: ir.Value) -> ir.Value:
        return self.Unsqueeze(scalar, self.const([0]))

    def function(self, name: str, overload: str, outputs: Sequence[ir.Value],
                 attributes: Sequence[str], output_names: Sequence[str] | None = None
                 ) -> ir.Function:
        names = _output_names(name) if output_names is None else output_names
        for value, out_name in zip(outputs, names, strict=True):
            value.name = out_name
        graph = ir.Graph(self.inputs, list(outputs), nodes=self.tape.nodes,
                         opset_imports={"": OPSET}, name=f"{name}_{overload}")
        attrs = [ir.Attr(attr, _ATTRIBUTE_TYPES[attr], None) for attr in attributes]
        return ir.Function(DOMAIN, name, overload, graph=graph, attributes=attrs)


_ATTRIBUTE_TYPES = {
    "causal": ir.AttributeType.INT, "window": ir.AttributeType.INT,
    "scale": ir.AttributeType.FLOAT, "sinks": ir.AttributeType.INT,
    "compensation": ir.AttributeType.INT, "selected": ir.AttributeType.INT,
    "observation_window": ir.AttributeType.INT, "key_bits": ir.AttributeType.INT,
    "value_bits": ir.AttributeType.INT, "group": ir.AttributeType.INT,
}


def _output_names(op: str) -> tuple[str, ...]:
    if op == ATTENTION:
        return ("out",)
    return ("k_out", "v_out", "bias_out", "counters_out")


def _safe_softmax(b: _Body, scores: ir.Value) -> ir.Value:
    """Softmax over the last axis; a fully masked row gives 0, not NaN (``ops._safe_softmax_``)."""
    last = b.const([-1])
    top = b.Max(b.ReduceMax(scores, last, keepdims=1), b.const(_FLOAT_MIN, np.float32))
    exp = b.Exp(b.Sub(scores, top))
    total = b.Max(b.ReduceSum(exp, last, keepdims=1), b.const(_FLOAT_TINY, np.float32))
    return b.Div(exp, total)


def _attend(b: _Body, q: ir.Value, k: ir.Value, v: ir.Value, bias: ir.Value | None,
            filled: ir.Value, queries: ir.Value, query_start: ir.Value, key_start: ir.Value,
            rule: tuple[ir.Value, ir.Value, ir.Value]) -> ir.Value:
    """Queries ``q [B, Hq, Tq, D]`` (numbers ``query_start..`` of the ``queries`` last ones)
    over keys ``k, v [B, Hkv, Sk, D]`` (positions ``key_start..``) of rows holding ``filled
    [B]`` keys; ``rule`` = (causal, window, scale) values. Returns ``[B, Hq, Tq, D]``."""
    causal, window, scale = rule
    batch, hq, tq, d = (b.dim(q, axis) for axis in range(4))
    hkv, sk = b.dim(k, 1), b.dim(k, 2)
    group = b.Div(hq, hkv)
    rows = b.Mul(group, tq)
    scaled = b.Mul(b.Reshape(q, b.Concat(batch, hkv, rows, d, axis=0)), scale)
    scores = b.MatMul(scaled, b.Transpose(k, perm=[0, 1, 3, 2]))  # [B, Hkv, g*Tq, Sk]
    scores = b.Reshape(scores, b.Concat(batch, hkv, group, tq, sk, axis=0))
    if bias is not None:
        scores = b.Add(scores, b.Unsqueeze(bias, b.const([2, 3])))
    # visible keys [B, Tq, Sk]: filled, causal, in the window
    zero, one = b.const(0), b.const(1)
    key_pos = b.Add(key_start, b.Range(zero, b.scalar(sk), one))
    query_pos = b.Add(b.Add(b.Sub(b.Unsqueeze(filled, b.const([1])), queries), query_start),
                      b.Range(zero, b.scalar(tq), one))  # [B, Tq]
    query_pos = b.Unsqueeze(query_pos, b.const([2]))
    visible = b.Less(key_pos, b.Unsqueeze(filled, b.const([1, 2])))
    visible = b.And(visible, b.Or(b.Equal(causal, zero), b.LessOrEqual(key_pos, query_pos)))
    visible = b.And(visible, b.Or(b.Equal(window, zero),
                                  b.Greater(key_pos, b.Sub(query_pos, window))))
    scores = b.Where(b.Unsqueeze(visible, b.const([1, 2])), scores,
                     b.const(float("-inf"), np.float32))
    probs = b.Reshape(_safe_softmax(b, scores), b.Concat(batch, hkv, rows, sk, axis=0))
    return b.Reshape(b.MatMul(probs, v), b.Concat(batch, hq, tq, d, axis=0))


def _attend_in_chunks(b: _Body, q: ir.Value, k: ir.Value, v: ir.Value,
                      rule: tuple[ir.Value, ir.Value, ir.Value]) -> ir.Value:
    """Prefill attention (every slot a key) in chunks of ``QUERY_CHUNK`` queries, each over
    only the keys it can see, as ``ops._attention_chunked`` does: memory follows the chunk,
    not ``T x S``. A ``Loop`` whose scan output is the chunks padded to the chunk size."""
    causal, window, _ = rule
    batch, hq, t, d = (b.dim(q, axis) for axis in range(4))
    keys = b.dim(k, 2)
    filled = b.Expand(keys, batch)
    chunk = b.const(QUERY_CHUNK)
    trips = b.Div(b.Add(b.scalar(t), b.const(QUERY_CHUNK - 1)), chunk)
    offset = b.scalar(b.Sub(keys, t))  # query i sits at key position offset + i
    loop = _Body(["chunk_iteration", "chunk_condition"])
    loop.inputs[0].type, loop.inputs[0].shape = ir.TensorType(_INT64), ir.Shape([])
    loop.inputs[1].type, loop.inputs[1].shape = ir.TensorType(ir.DataType.BOOL), ir.Shape([])
    iteration, condition = loop.inputs
    first = loop.Mul(iteration, chunk)
    last = loop.Min(loop.Add(first, chunk), loop.scalar(t))
    zero = loop.const(0)
    hi = loop.Where(loop.Equal(causal, zero), loop.scalar(keys), loop.Add(offset, last))
    lo = loop.Where(loop.Or(loop.Equal(causal, zero), loop.Equal(window, zero)), zero,
                    loop.Max(zero, loop.Sub(loop.Add(offset, first),
                                            loop.Sub(window, loop.const(1)))))
    axis = loop.const([2])
    part = _attend(loop, loop.Slice(q, loop.vec(first), loop.vec(last), axis),
                   loop.Slice(k, loop.vec(lo), loop.vec(hi), axis),
                   loop.Slice(v, loop.vec(lo), loop.vec(hi), axis),
                   None, filled, t, loop.vec(first), lo, rule)
    missing = loop.Sub(chunk, loop.Sub(last, first))
    pads = loop.Concat(loop.const([0, 0, 0, 0, 0, 0]), loop.vec(missing), loop.const([0]), axis=0)
    outputs = [loop.Identity(condition), loop.Pad(part, pads)]
    for index, node in enumerate(loop.tape.nodes):  # names apart from the enclosing body's
        for value in node.outputs:
            value.name = value.name or f"chunk_{index}_{value.index()}"
    body = ir.Graph(loop.inputs, outputs, nodes=loop.tape.nodes, name="query_chunk")
    stacked = b.Loop(trips, None, body=body)  # [chunks, B, Hq, QUERY_CHUNK, D]
    stacked = b.Transpose(stacked, perm=[1, 2, 0, 3, 4])
    flat = b.Reshape(stacked, b.Concat(batch, hq, b.const([-1]), d, axis=0))
    return b.Slice(flat, b.const([0]), t, b.const([2]))


def budgeted_attention(overload: str) -> ir.Function:
    """``kvcompile::BudgetedAttention``: ``ops.budgeted_attention`` in standard ops.

    q ``[B, Hq, T, D]``, k/v ``[B, Hkv, S, D]``; query head ``i`` uses KV head ``i // g``.
    ``bias [B, Hkv, S]`` is added to the logits; ``kv_length [B]`` keeps only the first
    ``kv_length[b]`` slots (the buffer is cut to the longest, so the cost follows the filled
    part); the queries are the last ``T`` of those ``n_b`` keys: ``causal`` lets query ``t``
    see keys ``j <= n_b - T + t``, ``window > 0`` also needs ``j > n_b - T + t - window``.
    The ``plain`` overload (prefill) runs in query chunks, each over the keys it can see.
    """
    if overload not in ATTENTION_OVERLOADS:
        raise ValueError(f"unknown BudgetedAttention overload {overload!r}")
    b = _Body(["q", "k", "v", "bias", "kv_length"])
    q, k, v, bias, kv_length = b.inputs
    rule = (b.attr("causal"), b.attr("window"), b.attr("scale", ir.AttributeType.FLOAT))
    if overload == "plain":
        out = _attend_in_chunks(b, q, k, v, rule)
    else:
        if overload == "length":
            keys = b.ReduceMax(kv_length, b.const([0]), keepdims=1)
            k = b.Slice(k, b.const([0]), keys, b.const([2]))
            v = b.Slice(v, b.const([0]), keys, b.const([2]))
            filled = kv_length
        else:
            filled = b.Expand(b.dim(k, 2), b.dim(q, 0))
        zero = b.const(0)
        out = _attend(b, q, k, v, bias if overload == "bias" else None, filled, b.dim(q, 2),
                      zero, zero, rule)
    return b.function(ATTENTION, overload, [out], ["causal", "window", "scale"])


def budgeted_cache_update() -> ir.Function:
    """``kvcompile::BudgetedCacheUpdate``: ``ops.budgeted_cache_update`` in standard ops.

    Appends one token per row (``k_new/v_new [B, H, 1, D]``) to buffers ``[B, H, C, D]`` with
    slots sinks | compensation | selected | ring window, ``bias [B, H, C]`` and ``counters
    [B, 4] = (sink_used, window_pushed, selected_used, comp_n)``. When the ring is full its
    oldest token moves to a free selected slot, else is folded into the compensation mean
    ``(n x + x_old) / (n + 1)`` (bias ``ln(n + 1)``), else dropped; the new token takes its slot.
    """
    b = _Body(["k_buf", "v_buf", "bias", "counters", "k_new", "v_new"])
    k_buf, v_buf, bias, counters, k_new, v_new = b.inputs
    sinks, comp, selected, window = (b.attr(name) for name in
                                     ("sinks", "compensation", "selected", "window"))
    zero, one = b.const(0), b.const(1)
    batch, heads = b.dim(k_buf, 0), b.dim(k_buf, 1)
    # the only read of `counters`: every later use is of these copies
    sink_used, pushed, sel_used, comp_n = b.Split(counters, axis=1, num_outputs=4, outputs=4)
    in_sink = b.Less(sink_used, sinks)  # [B, 1]
    ring_full = b.And(b.Not(in_sink), b.GreaterOrEqual(pushed, window))
    ring_start = b.Add(b.Add(sinks, comp), selected)
    ring_slot = b.Add(ring_start, b.Mod(pushed, window))  # oldest token = the new token's slot
    to_sel = b.And(ring_full, b.Less(sel_used, selected))
    to_comp = b.And(b.And(ring_full, b.Not(to_sel)), b.Equal(comp, one))
    new_slot = b.Where(in_sink, sink_used, ring_slot)
    comp_slot = b.Expand(sinks, b.Shape(sink_used))
    sel_slot = b.Add(b.Add(sinks, comp),
                     b.Min(sel_used, b.Max(b.Sub(selected, one), zero)))
    # the writes that exist for this layout, always at three distinct slots
    keep = b.Concat(b.const([True], np.bool_), b.vec(b.Equal(comp, one)),
                    b.vec(b.Greater(selected, zero)), axis=0)
    slots = b.Compress(b.Concat(new_slot, comp_slot, sel_slot, axis=1), keep, axis=1)  # [B, n]

    # one read per buffer of the three slots a step may change: [ring, compensation, selected]
    read = b.Concat(ring_slot, comp_slot, sel_slot, axis=1)  # [B, 3]
    read = b.Expand(b.Reshape(read, b.const([0, 1, 3, 1])),
                    b.Concat(batch, heads, b.const([3, 1]), axis=0))  # [B, H, 3, 1]
    rows4 = b.const([-1, 1, 1, 1])
    n = b.Reshape(b.Cast(comp_n, to=_FLOAT), rows4)
    to_sel4, to_comp4 = b.Reshape(to_sel, rows4), b.Reshape(to_comp, rows4)
    outputs = []
    for buffer, new in ((k_buf, k_new), (v_buf, v_new)):
        old, current_comp, current_sel = b.Split(b.GatherND(buffer, read, batch_dims=2), axis=2,
                                                 num_outputs=3, outputs=3)  # [B, H, 1, D] each
        mean = b.Div(b.Add(b.Mul(n, current_comp), old), b.Add(n, b.const(1.0, np.float32)))
        mean = b.Where(b.Equal(n, b.const(0.0, np.float32)), old, mean)  # first fold: copy
        values = b.Concat(new, b.Where(to_comp4, mean, current_comp),
                          b.Where(to_sel4, old, current_sel), axis=2)
        values = b.Compress(values, keep, axis=2)  # [B, H, n, D]
        index = b.Expand(b.Reshape(slots, b.const([0, 1, -1, 1])), b.Shape(values))
        outputs.append(b.ScatterElements(buffer, index, values, axis=2))
    rows3 = b.const([-1, 1, 1])
    _, bias_comp, bias_sel = b.Split(b.GatherND(bias, read, batch_dims=2), axis=2,
                                     num_outputs=3, outputs=3)  # [B, H, 1] each
    log_count = b.Cast(b.Log(b.Cast(b.Add(comp_n, one), to=_DOUBLE)), to=_FLOAT)  # ops.log_count
    bias_values = b.Concat(
        b.Expand(b.const(0.0, np.float32), b.Shape(bias_comp)),
        b.Where(b.Reshape(to_comp, rows3), b.Reshape(log_count, rows3), bias_comp),
        b.Where(b.Reshape(to_sel, rows3), b.const(0.0, np.float32), bias_sel),
        axis=2)
    bias_values = b.Compress(bias_values, keep, axis=2)  # [B, H, n]
    bias_index = b.Expand(b.Reshape(slots, b.const([0, 1, -1])), b.Shape(bias_values))
    outputs.append(b.ScatterElements(bias, bias_index, bias_values, axis=2))
    counts = [b.Add(sink_used, b.Cast(in_sink, to=_INT64)),
              b.Add(pushed, b.Cast(b.Not(in_sink), to=_INT64)),
              b.Add(sel_used, b.Cast(to_sel, to=_INT64)),
              b.Add(comp_n, b.Cast(to_comp, to=_INT64))]
    outputs.append(b.Concat(*counts, axis=1))
    return b.function(CACHE_UPDATE, "", outputs, ["sinks", "compensation", "selected", "window"])


def _selection_scores(b: _Body, overload: str, q: ir.Value, k: ir.Value) -> ir.Value:
    """Keep scores ``[B, H, L]`` (``cache.selection_scores``)."""
    if overload == "key_norm":
        return b.Neg(b.ReduceL2(k, b.const([3]), keepdims=0))
    zero, one = b.const(0), b.const(1)
    batch, heads, length, d = (b.dim(k, axis) for axis in range(4))
    observed = b.Max(one, b.Min(b.attr("observation_window"), length))
    q_obs = b.Slice(q, b.Sub(length, observed), length, b.const([2]))
    group = b.Div(b.dim(q, 1), heads)
    q_obs = b.Reshape(b.Mul(q_obs, b.attr("scale", ir.AttributeType.FLOAT)),
                      b.Concat(batch, heads, b.Mul(group, observed), d, axis=0))
    logits = b.MatMul(q_obs, b.Transpose(k, perm=[0, 1, 3, 2]))
    logits = b.Reshape(logits, b.Concat(batch, heads, group, observed, length, axis=0))
    query_pos = b.Add(b.Sub(length, observed), b.Range(zero, b.scalar(observed), one))
    future = b.Greater(b.Range(zero, b.scalar(length), one),
                       b.Unsqueeze(query_pos, b.const([1])))  # [obs, L]
    logits = b.Where(future, b.const(float("-inf"), np.float32), logits)
    probs = b.Softmax(logits, axis=-1)
    return b.ReduceSum(probs, b.const([2, 3]), keepdims=0)


def compress_prefill(overload: str) -> ir.Function:
    """``kvcompile::CompressPrefill``: what a prompt leaves in a budgeted buffer.

    ``k, v [B, H, L, D]`` (and the group's queries ``q [B, g*H, L, D]``) -> the state of
    ``cache.compress_prefill``: the first ``sinks`` tokens, the top-``selected`` middle
    tokens by the selection score (ties -> earlier, kept in position order), the last
    ``window`` tokens in their ring slots, the other middle tokens folded into the
    compensation mean (bias ``ln n``), empty slots zero with bias ``-inf``, and the counters.
    """
    if overload not in SELECTION_OVERLOADS:
        raise ValueError(f"unknown CompressPrefill overload {overload!r}")
    b = _Body(["q", "k", "v"])
    q, k, v = b.inputs
    sinks, comp, selected, window = (b.vec(b.attr(name)) for name in
                                     ("sinks", "compensation", "selected", "window"))
    zero, one = b.const([0]), b.const([1])
    batch, heads, length, d = (b.dim(k, axis) for axis in range(4))
    n_sink = b.Min(length, sinks)
    rest = b.Sub(length, n_sink)
    n_mid = b.Sub(rest, b.Min(rest, window))
    n_sel = b.Min(n_mid, selected)
    n_comp = b.Mul(comp, b.Sub(n_mid, n_sel))
    neg_inf = b.const([float("-inf")], np.float32)
    # selection: top `selected` middle tokens, then sorted by position; missing picks -> L + rank
    token = b.Range(b.scalar(zero), b.scalar(length), b.scalar(one))
    middle = b.And(b.GreaterOrEqual(token, sinks), b.Less(token, b.Add(sinks, n_mid)))
    scores = b.Where(middle, _selection_scores(b, overload, q, k), neg_inf)
    padded = b.Concat(scores, b.Expand(neg_inf, b.Concat(batch, heads, selected, axis=0)), axis=2)
    _, top = b.TopK(padded, selected, axis=-1, largest=1, sorted=1, outputs=2)
    rank = b.Range(b.scalar(zero), b.scalar(selected), b.scalar(one))
    picked = b.Where(b.Less(rank, n_sel), top, b.Add(length, rank))
    picked, _ = b.TopK(picked, selected, axis=-1, largest=0, sorted=1, outputs=2)  # [B, H, h]
    chosen = b.ScatterElements(
        b.Expand(b.const([0.0], np.float32), b.Concat(batch, heads, b.Add(length, selected),
                                                     axis=0)),
        picked, b.Expand(b.const([1.0], np.float32), b.Shape(picked)), axis=2)
    chosen = b.Slice(chosen, zero, length, b.const([2]))
    folded = b.Mul(b.Cast(middle, to=_FLOAT), b.Sub(b.const([1.0], np.float32), chosen))
    # the source token of every slot and whether the slot is filled
    sel_start = b.Add(sinks, comp)
    ring_start = b.Add(sel_start, selected)
    capacity = b.Add(ring_start, window)
    slot = b.Range(b.scalar(zero), b.scalar(capacity), b.scalar(one))
    is_sink = b.Less(slot, sinks)
    is_sel = b.And(b.GreaterOrEqual(slot, sel_start), b.Less(slot, ring_start))
    is_ring = b.GreaterOrEqual(slot, ring_start)
    is_comp = b.And(b.GreaterOrEqual(slot, sinks), b.Less(slot, sel_start))
    last = b.Sub(rest, one)  # the newest token's offset after the sinks
    offset = b.Sub(last, b.Mod(b.Sub(last, b.Sub(slot, ring_start)), window))
    sel_rank = b.Sub(slot, sel_start)
    filled = b.Or(b.Or(b.And(is_sink, b.Less(slot, n_sink)),
                       b.And(is_ring, b.GreaterOrEqual(offset, zero))),
                  b.And(is_sel, b.Less(sel_rank, n_sel)))
    fixed_source = b.Where(is_sink, slot, b.Where(is_ring, b.Add(sinks, offset), zero))
    picked = b.Concat(picked, b.Expand(zero, b.Concat(batch, heads, one, axis=0)), axis=2)
    sel_source = b.Gather(picked, b.Clip(sel_rank, b.scalar(zero), b.scalar(selected)),
                          axis=2)  # [B, H, C]
    source = b.Clip(b.Where(is_sel, sel_source, fixed_source), b.scalar(zero),
                    b.scalar(b.Sub(length, one)))
    index = b.Expand(b.Unsqueeze(source, b.const([3])), b.Concat(batch, heads, capacity, d,
                                                                 axis=0))
    with_comp = b.And(is_comp, b.Greater(n_comp, zero))
    count = b.Cast(b.Max(n_comp, one), to=_FLOAT)
    outputs = []
    for tokens in (k, v):
        gathered = b.Where(b.Unsqueeze(filled, b.const([1])),
                           b.GatherElements(tokens, index, axis=2), b.const(0.0, np.float32))
        mean = b.Div(b.ReduceSum(b.Mul(tokens, b.Unsqueeze(folded, b.const([3]))),
                                 b.const([2]), keepdims=1), count)
        outputs.append(b.Where(b.Unsqueeze(with_comp, b.const([1])), mean, gathered))
    log_count = b.Cast(b.Log(b.Cast(b.Max(n_comp, one), to=_DOUBLE)), to=_FLOAT)
    slot_bias = b.Where(filled, b.const(0.0, np.float32), neg_inf)
    slot_bias = b.Where(with_comp, log_count, slot_bias)
    outputs.append(b.Expand(slot_bias, b.Concat(batch, heads, capacity, axis=0)))
    counts = b.Concat(n_sink, rest, n_sel, n_comp, axis=0)
    outputs.append(b.Expand(b.Unsqueeze(counts, zero), b.Concat(batch, b.const([4]), axis=0)))
    return b.function(COMPRESS_PREFILL, overload, outputs,
                      ["sinks", "compensation", "selected", "window", "observation_window",
                       "scale"])


def function_for(op_type: str, overload: str) -> ir.Function:
    """The reference body of one ``(kvcompile op, overload)``."""
    from . import quant_functions

    if op_type in quant_functions.OPS:
        return quant_functions.function_for(op_type, overload)
    if op_type == ATTENTION:
        return budgeted_attention(overload)
    if op_type == CACHE_UPDATE and overload == "":
        return budgeted_cache_update()
    if op_type == COMPRESS_PREFILL:
        return compress_prefill(overload)
    raise ValueError(f"no reference body for {DOMAIN}::{op_type} overload {overload!r}")
