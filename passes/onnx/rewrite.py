"""Rewrite the source graphs' attention and cache into the plan's static-budget form.

Per layer, after :class:`~kvcompile.passes.onnx.permute.PermuteKVHeads` (full heads first):

* prefill: the standard ``Attention`` becomes ``kvcompile::BudgetedAttention`` (exact causal
  attention over the prompt, the layer's window for sliding layers) — an onnxscript rewrite
  rule; the ``Pad`` that filled the fixed-size cache output becomes a ``Pad`` of the full
  heads (``present.{i}.full_*``) and a ``kvcompile::CompressPrefill`` of the budgeted ones
  (``present.{i}.budget_*``: sinks, selected tokens, window, compensation mean, bias,
  counters);
* decode: the two ``TensorScatter`` writes and the ``Attention`` over the whole-layer buffer
  become a ``TensorScatter`` into the full heads' buffer attended by
  ``BudgetedAttention(kv_length)``, and a ``kvcompile::BudgetedCacheUpdate`` of the budgeted
  buffers attended by ``BudgetedAttention(bias)``; their outputs are concatenated in head
  order, where the old attention output was used.

A group the plan stores quantized (``runtime/quant_cache.py``) gets ``QuantizeKV`` at
prefill (the full heads' whole token groups, with the rest ``Pad``-ded into a residual ring;
the budgeted heads' selected slots, cut out of ``CompressPrefill``'s state), and at decode
``QuantizedAppend`` + ``QuantizedAttention(length)`` (full heads) or the unchanged
``BudgetedCacheUpdate`` on the full-precision part + ``QuantizedAttention(bias)`` (budgeted
heads, codes passed through). Full-precision layers are rewritten exactly as before.

The cache inputs and outputs are replaced by those of ``runtime/onnx_io.py``; what fed only the
old ones (the valid-length masks) is left for ``RemoveUnusedNodesPass``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleClassBase, RewriteRuleSet
from onnxscript.rewriter import rewrite as apply_rules

from kvcompile.arch import ArchSpec
from kvcompile.memory import body_tokens, residual_tokens
from kvcompile.plan import LayerPlan, Plan, Storage
from kvcompile.runtime import onnx_io

from .functions import ATTENTION, CACHE_UPDATE, COMPRESS_PREFILL
from .quant_functions import APPEND, QUANTIZE
from .quant_functions import ATTENTION as QUANTIZED_ATTENTION

_FLOAT, _INT64 = ir.DataType.FLOAT, ir.DataType.INT64
_DTYPES = {"float32": _FLOAT, "int64": _INT64, "float16": ir.DataType.FLOAT16,
           "uint8": ir.DataType.UINT8}


def _single_use(value: ir.Value, op_type: str, index: int) -> ir.Node:
    """The one node reading ``value`` as input ``index``, which must be an ``op_type``."""
    uses = [use for use in value.uses() if use.idx == index]
    if len(uses) != 1 or uses[0].node.op_type != op_type:
        found = [(use.node.op_type, use.idx) for use in value.uses()]
        raise ir.passes.PreconditionError(
            f"{value.name}: expected one {op_type} reading it as input {index}, found {found}")
    return uses[0].node


def _producer(value: ir.Value, op_type: str) -> ir.Node:
    node = value.producer()
    if node is None or node.op_type != op_type:
        raise ir.passes.PreconditionError(
            f"{value.name} is not produced by {op_type} "
            f"({None if node is None else node.op_type})")
    return node


def _named(graph_values: Sequence[ir.Value]) -> dict[str, ir.Value]:
    return {value.name: value for value in graph_values}


def _attention_scale(node: ir.Node, head_dim: int) -> float:
    return node.attributes.get_float("scale", 1.0 / math.sqrt(head_dim))


class _Tape(ir.tape.Tape):
    """A tape with the constants the rewrites need."""

    def const(self, values, dtype=np.int64) -> ir.Value:
        return self.op("Constant", [], attributes={"value": ir.tensor(np.array(values, dtype))})

    def split_heads(self, value: ir.Value, sizes: tuple[int, int]) -> tuple[ir.Value | None, ...]:
        """``value [B, H, ...]`` cut into its first ``sizes[0]`` and next ``sizes[1]`` heads."""
        if not sizes[0] or not sizes[1]:
            return (value, None) if sizes[0] else (None, value)
        return tuple(self.op_multi_out("Split", [value, self.const(list(sizes))],
                                       attributes={"axis": 1}, num_outputs=2))

    def kvcompile(self, op_type: str, inputs: Sequence[ir.Value | None], overload: str,
                  attributes: dict, outputs: int = 1) -> Sequence[ir.Value]:
        return self.op_multi_out(op_type, list(inputs), attributes=attributes,
                                 domain=onnx_io.DOMAIN, overload=overload,
                                 version=onnx_io.DOMAIN_VERSION, num_outputs=outputs)


def _name_cache_outputs(values: Sequence[ir.Value], specs: Sequence[onnx_io.CacheTensor]) -> None:
    for value, spec in zip(values, specs, strict=True):
        value.name = spec.output_name
        value.type = ir.TensorType(_DTYPES[spec.dtype])
        value.shape = ir.Shape([onnx_io.BATCH if d is None else d for d in spec.shape])


def _cache_input(spec: onnx_io.CacheTensor) -> ir.Value:
    return ir.Value(name=spec.input_name,
                    type=ir.TensorType(_DTYPES[spec.dtype]),
                    shape=ir.Shape([onnx_io.BATCH if d is None else d for d in spec.shape]))


def _layout_attributes(layer: LayerPlan) -> dict[str, int]:
    layout = layer.layout
    assert layout is not None
    return {"sinks": layout.sinks, "compensation": layout.compensation,
            "selected": layout.selected, "window": layout.window}


def _storage_attributes(storage: Storage) -> dict[str, int]:
    return {"key_bits": storage.key_bits, "value_bits": storage.value_bits,
            "group": storage.group}


def _prefill_quantized_full(tape: _Tape, index: int, layer: LayerPlan,
                            kv: tuple[ir.Value, ir.Value], pads: list[ir.Node],
                            max_context: int) -> list[ir.Value]:
    """A quantized full group after the prompt ``k, v [B, H, T, D]`` (``QuantizedFullBuffer.fill``):
    its whole token groups quantized into the body (``QuantizeKV``), the last ``T % group``
    tokens in residual slots ``0 ..`` (``Pad``), zeros after both."""
    storage = layer.full_storage
    group, body = storage.group, body_tokens(storage, max_context)
    if not body:
        raise ir.passes.PreconditionError(
            f"layer {index}: quantized full heads need a context of at least one token group "
            f"({group}), got {max_context}")
    length = tape.op("Shape", [kv[0]], {"start": 2, "end": 3})
    whole = tape.op("Mul", [tape.op("Div", [length, tape.const([group])]), tape.const([group])])
    held = tape.op("Expand", [whole, tape.op("Shape", [kv[0]], {"start": 0, "end": 1})])
    axis = tape.const([2])
    bodies = [tape.op("Slice", [tape.op("Pad", [x, *pad.inputs[1:]]), tape.const([0]),
                                tape.const([body]), axis]) for x, pad in zip(kv, pads, strict=True)]
    codes = tape.kvcompile(QUANTIZE, [*bodies, held], "", _storage_attributes(storage), outputs=6)
    ring = residual_tokens(storage, max_context)
    fill = tape.op("Sub", [tape.const([ring]), tape.op("Sub", [length, whole])])
    ring_pads = tape.op("Concat", [tape.const([0] * 6), fill, tape.const([0])], {"axis": 0})
    rings = [tape.op("Pad", [tape.op("Slice", [x, whole, length, axis]), ring_pads]) for x in kv]
    return [*codes, *rings]


def _prefill_quantized_selected(tape: _Tape, layer: LayerPlan,
                                state: Sequence[ir.Value]) -> list[ir.Value]:
    """``CompressPrefill``'s full state -> ``QuantizedBudgetedBuffer.compress``'s: the selected
    slots quantized (``QuantizeKV`` over the ``selected_used`` filled ones), the other slots
    kept in full precision in layout ``(s, c, 0, w)`` with ``selected_used`` 0."""
    lay = layer.layout
    assert lay is not None
    k_buf, v_buf, bias, counters = state
    head = lay.sinks + lay.compensation
    kept = tape.const(list(range(head)) + list(range(head + lay.selected, lay.capacity)))
    fp = [tape.op("Gather", [t, kept], {"axis": 2}) for t in (k_buf, v_buf, bias)]
    fp.append(tape.op("Mul", [counters, tape.const([[1, 1, 0, 1]])]))
    selected = tape.op("Gather", [counters, tape.const(2)], {"axis": 1})  # [B]
    span = [tape.const([head]), tape.const([head + lay.selected]), tape.const([2])]
    codes = tape.kvcompile(QUANTIZE, [tape.op("Slice", [k_buf, *span]),
                                      tape.op("Slice", [v_buf, *span]), selected], "",
                           _storage_attributes(layer.budget_storage), outputs=6)
    return [*fp, *codes, selected]


def _decode_quantized_full(tape: _Tape, layer: LayerPlan, state: Sequence[ir.Value],
                           position: ir.Value, kv_length: ir.Value,
                           qkv: tuple[ir.Value, ir.Value, ir.Value],
                           scale: float) -> tuple[list[ir.Value], ir.Value]:
    """``QuantizedFullBuffer.write`` + ``attend``: the new token into the residual ring
    (flushed into the body when full), then attention over the body's codes and the ring."""
    storage = layer.full_storage
    attrs = _storage_attributes(storage)
    q, k, v = qkv
    updated = tape.kvcompile(APPEND, [*state, position, k, v], "", attrs, outputs=8)
    in_ring = tape.op("Mod", [kv_length, tape.const([storage.group])])
    in_body = tape.op("Sub", [kv_length, in_ring])
    (out,) = tape.kvcompile(QUANTIZED_ATTENTION, [q, *updated[:6], in_body, *updated[6:], None,
                                                  in_ring], "length", {**attrs, "scale": scale})
    return list(updated), out


def _decode_quantized_selected(tape: _Tape, layer: LayerPlan, state: Sequence[ir.Value],
                               qkv: tuple[ir.Value, ir.Value, ir.Value],
                               scale: float) -> tuple[list[ir.Value], ir.Value]:
    """``QuantizedBudgetedBuffer.append`` + ``attend``: the unchanged cache update on the
    full-precision part (layout ``(s, c, 0, w)``), the codes passed through (``Identity``:
    written once, at prefill), attention over both."""
    q, k, v = qkv
    updated = tape.kvcompile(CACHE_UPDATE, [*state[:4], k, v], "",
                             {**_layout_attributes(layer), "selected": 0}, outputs=4)
    (out,) = tape.kvcompile(QUANTIZED_ATTENTION, [q, *state[4:], *updated[:3]], "bias",
                            {**_storage_attributes(layer.budget_storage), "scale": scale})
    kept = [tape.op("Identity", [value]) for value in state[4:]]
    return [*updated, *kept], out


class _PrefillAttentionRule(RewriteRuleClassBase):
    """``Attention(q, k, v[, mask])`` of layer ``i`` -> ``BudgetedAttention(q, k, v)``, causal,
    with the plan's window for a sliding layer (the mask only encoded the model's window)."""

    def __init__(self, windows: dict[int, int]) -> None:
        super().__init__("prefill-attention-to-budgeted", remove_nodes=True)
        self.windows = windows  # id of a layer's key value -> the layer's window

    def pattern(self, op, q, k, v):
        return op.Attention(q, k, v, _allow_other_inputs=True, _allow_other_attributes=True,
                            _outputs=["out"])

    def check(self, context, q, k, v, out, **_):
        from onnxscript.rewriter import MatchResult

        result = MatchResult()
        node = out.producer()
        if id(k) not in self.windows:
            return result.fail("not the attention of a layer's cache")
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            if self.windows[id(k)] == 0:
                return result.fail("a masked attention in a layer without a window")
        elif node.attributes.get_int("is_causal", 0) != 1:
            return result.fail("prefill attention must be causal")
        if any(value is not None for value in node.inputs[4:]):
            return result.fail("attention with past state: not a prefill graph")
        if "scale" not in node.attributes and not (
                q.shape is not None and len(q.shape) == 4 and isinstance(q.shape[-1], int)):
            return result.fail("no scale attribute and no static head size: the scale is unknown")
        return result

    def rewrite(self, op, q, k, v, out, **_):
        node = out.producer()
        scale = _attention_scale(node, q.shape[-1] if "scale" not in node.attributes else 1)
        result = op.BudgetedAttention(q, k, v, _domain=onnx_io.DOMAIN,
                                      _version=onnx_io.DOMAIN_VERSION, causal=1,
                                      window=self.windows[id(k)], scale=scale)
        result.producer().overload = "plain"
        return result


class RewritePrefillAttention(ir.passes.InPlacePass):
    """Every layer's prefill ``Attention`` -> ``kvcompile::BudgetedAttention`` (overload plain)."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.plan = plan

    def _layer_keys(self, model: ir.Model) -> dict[int, int]:
        outputs = _named(model.graph.outputs)
        windows = {}
        for index, layer in enumerate(self.plan.layers):
            name = onnx_io.source_present("key", index)
            if name not in outputs:
                raise ir.passes.PreconditionError(f"no output {name}: not a source prefill graph")
            key = _producer(outputs[name], "Pad").inputs[0]
            windows[id(key)] = layer.prefill_window
        return windows

    def requires(self, model: ir.Model) -> None:
        self._layer_keys(model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        windows = self._layer_keys(model)
        rule = _PrefillAttentionRule.rule(windows)
        before = sum(1 for node in model.graph if node.op_type == "Attention")
        apply_rules(model, pattern_rewrite_rules=RewriteRuleSet([rule]))
        return ir.passes.PassResult(model, before != sum(
            1 for node in model.graph if node.op_type == "Attention"))

    def ensures(self, model: ir.Model) -> None:
        left = [node.name for node in model.graph if node.op_type == "Attention"]
        if left:
            raise ir.passes.PostconditionError(f"attention nodes left unrewritten: {left[:3]}")


class RewritePrefillCache(ir.passes.InPlacePass):
    """The prefill graph's fixed-size cache outputs -> the plan's full and budgeted state."""

    def __init__(self, plan: Plan, arch: ArchSpec, max_context: int) -> None:
        super().__init__()
        self.plan, self.arch, self.max_context = plan, arch, max_context

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, arch = model.graph, self.arch
        outputs = _named(graph.outputs)
        new_outputs = []
        for index, layer in enumerate(self.plan.layers):
            pads = [_producer(outputs[onnx_io.source_present(kind, index)], "Pad")
                    for kind in ("key", "value")]
            key, value = pads[0].inputs[0], pads[1].inputs[0]
            attention = _single_use(key, ATTENTION, 1)
            query = attention.inputs[0]
            n_full, n_budget = len(layer.full_heads), len(layer.budgeted_heads)
            specs = onnx_io.layer_cache_tensors(index, layer, self.max_context, arch.head_dim)
            tape = _Tape()
            k_full, k_budget = tape.split_heads(key, (n_full, n_budget))
            v_full, v_budget = tape.split_heads(value, (n_full, n_budget))
            produced: list[ir.Value] = []
            if n_full and layer.quantized_full:
                produced += _prefill_quantized_full(tape, index, layer, (k_full, v_full),
                                                    pads, self.max_context)
            elif n_full:
                produced += [tape.op("Pad", [k_full, *pads[0].inputs[1:]]),
                             tape.op("Pad", [v_full, *pads[1].inputs[1:]])]
            if n_budget:
                g = arch.group_size
                _, q_budget = tape.split_heads(query, (n_full * g, n_budget * g))
                attrs = {**_layout_attributes(layer), "scale": _attention_scale(
                    attention, arch.head_dim), "observation_window": self.plan.selection.observation_window}
                state = tape.kvcompile(COMPRESS_PREFILL, [q_budget, k_budget, v_budget],
                                       self.plan.selection.rule, attrs, outputs=4)
                if onnx_io.quantized_selected(layer):
                    state = _prefill_quantized_selected(tape, layer, state)
                produced += state
            _name_cache_outputs(produced, specs)
            graph.insert_before(attention, tape.nodes)
            new_outputs += produced
        logits = outputs[onnx_io.LOGITS]
        graph.outputs.clear()
        graph.outputs.extend([logits, *new_outputs])
        return ir.passes.PassResult(model, True)


class RewriteDecode(ir.passes.InPlacePass):
    """The decode graph's cache writes and attention -> the plan's static-budget form."""

    def __init__(self, plan: Plan, arch: ArchSpec, max_context: int) -> None:
        super().__init__()
        self.plan, self.arch, self.max_context = plan, arch, max_context

    def _anchors(self, model: ir.Model, index: int) -> tuple[ir.Node, ir.Node, ir.Node]:
        """Layer ``index``'s key write, value write and attention."""
        inputs = _named(model.graph.inputs)
        writes = []
        for kind in ("key", "value"):
            name = onnx_io.source_past(kind, index)
            if name not in inputs:
                raise ir.passes.PreconditionError(f"no input {name}: not a source decode graph")
            writes.append(_single_use(inputs[name], "TensorScatter", 0))
        attention = _single_use(writes[0].outputs[0], "Attention", 1)
        if attention.inputs[2] is not writes[1].outputs[0]:
            raise ir.passes.PreconditionError(f"layer {index}: the attention does not read the "
                                              f"layer's value cache")
        return writes[0], writes[1], attention

    def requires(self, model: ir.Model) -> None:
        for index in range(len(self.plan.layers)):
            self._anchors(model, index)
        if onnx_io.PAST_LENGTH not in _named(model.graph.inputs):
            raise ir.passes.PreconditionError(f"no input {onnx_io.PAST_LENGTH}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, arch = model.graph, self.arch
        inputs, outputs = _named(graph.inputs), _named(graph.outputs)
        past_length = inputs[onnx_io.PAST_LENGTH]
        first = self._anchors(model, 0)[0]
        tape = _Tape()
        kv_length = tape.op("Add", [past_length, tape.const([1])])  # one token per step
        graph.insert_before(first, tape.nodes)
        new_inputs, new_outputs, old_nodes = [], [], []
        for index, layer in enumerate(self.plan.layers):
            write_k, write_v, attention = self._anchors(model, index)
            query, key, value = attention.inputs[0], write_k.inputs[1], write_v.inputs[1]
            position = write_k.inputs[2]
            n_full, n_budget = len(layer.full_heads), len(layer.budgeted_heads)
            g = arch.group_size
            specs = onnx_io.layer_cache_tensors(index, layer, self.max_context, arch.head_dim)
            cache_in = [_cache_input(spec) for spec in specs]
            scale = _attention_scale(attention, arch.head_dim)
            tape = _Tape()
            q_full, q_budget = tape.split_heads(query, (n_full * g, n_budget * g))
            k_full, k_budget = tape.split_heads(key, (n_full, n_budget))
            v_full, v_budget = tape.split_heads(value, (n_full, n_budget))
            produced, parts = [], []
            n_specs = 0
            if n_full and layer.quantized_full:
                n_specs = len(onnx_io.QUANTIZED_FULL_PARTS)
                updated, part = _decode_quantized_full(tape, layer, cache_in[:n_specs], position,
                                                       kv_length, (q_full, k_full, v_full), scale)
                produced += updated
                parts.append(part)
            elif n_full:
                n_specs = len(onnx_io.FULL_PARTS)
                full_k = tape.op("TensorScatter", [cache_in[0], k_full, position], {"axis": 2})
                full_v = tape.op("TensorScatter", [cache_in[1], v_full, position], {"axis": 2})
                produced += [full_k, full_v]
                parts += tape.kvcompile(ATTENTION, [q_full, full_k, full_v, None, kv_length],
                                        "length", {"causal": 1, "window": 0, "scale": scale})
            if n_budget and onnx_io.quantized_selected(layer):
                updated, part = _decode_quantized_selected(tape, layer, cache_in[n_specs:],
                                                           (q_budget, k_budget, v_budget), scale)
                produced += updated
                parts.append(part)
            elif n_budget:
                state = cache_in[n_specs:]
                updated = tape.kvcompile(CACHE_UPDATE, [*state, k_budget, v_budget], "",
                                         _layout_attributes(layer), outputs=4)
                produced += updated
                parts += tape.kvcompile(ATTENTION, [q_budget, *updated[:3]], "bias",
                                        {"causal": 0, "window": 0, "scale": scale})
            out = parts[0] if len(parts) == 1 else tape.op("Concat", parts, {"axis": 1})
            _name_cache_outputs(produced, specs)
            graph.insert_before(attention, tape.nodes)
            ir.convenience.replace_all_uses_with(attention.outputs[0], out)
            new_inputs += cache_in
            new_outputs += produced
            old_nodes += [write_k, write_v, attention]
        graph.outputs.clear()
        graph.outputs.extend([outputs[onnx_io.LOGITS], *new_outputs])
        graph.remove(old_nodes, safe=True)
        kept = [inputs[onnx_io.INPUT_IDS], past_length]
        graph.inputs.clear()
        graph.inputs.extend([*kept, *new_inputs])
        return ir.passes.PassResult(model, True)
