"""Check a rewritten graph before it is written: the last pass, it changes nothing.

* ``onnx.checker`` full check, which includes strict shape inference (model-local function
  bodies included), via onnx-ir's ``CheckerPass`` (weights are lifted out while it runs);
* only the default domain at ``onnx_io.OPSET`` and ``kvcompile`` at its version, no other
  domain in nodes or function bodies;
* the inputs and outputs are exactly the plan's cache tensors (``onnx_io``), every one with a
  static shape but for the batch, and each layer's attention is ``kvcompile`` nodes: no
  standard ``Attention``, no ``Concat`` along the cache's slot axis, every cache output
  written by the node the static-budget form prescribes (quantized groups: their codes by
  ``QuantizeKV`` at prefill, ``QuantizedAppend`` or passed through at decode).
"""
from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import CheckerPass

from kvcompile.arch import ArchSpec
from kvcompile.plan import LayerPlan, Plan
from kvcompile.runtime import onnx_io

from .functions import ATTENTION, CACHE_UPDATE, COMPRESS_PREFILL
from .quant_functions import APPEND, QUANTIZE
from .quant_functions import ATTENTION as QUANTIZED_ATTENTION

KINDS = ("prefill", "decode")


class StaticBudgetGraphError(ir.passes.PostconditionError):
    """A rewritten graph is not the static-budget form the plan describes."""


def _dims(value: ir.Value) -> tuple[int | str | None, ...] | None:
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else d.value for d in value.shape)


def _expected_shape(spec: onnx_io.CacheTensor) -> tuple[int | str, ...]:
    return tuple(onnx_io.BATCH if d is None else d for d in spec.shape)


class ValidateStaticBudgetGraph(ir.passes.InPlacePass):
    """Fail with the first way the graph differs from the plan's static-budget form."""

    def __init__(self, plan: Plan, arch: ArchSpec, max_context: int, kind: str) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        self.plan, self.arch, self.max_context, self.kind = plan, arch, max_context, kind

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._check_opsets(model)
        self._check_io(model)
        self._check_layers(model)
        CheckerPass(full_check=True)(model)
        return ir.passes.PassResult(model, False)

    def _check_opsets(self, model: ir.Model) -> None:
        expected = {"": onnx_io.OPSET, onnx_io.DOMAIN: onnx_io.DOMAIN_VERSION}
        if dict(model.opset_imports) != expected:
            raise StaticBudgetGraphError(f"opsets {dict(model.opset_imports)}, expected {expected}")
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.domain not in expected:
                raise StaticBudgetGraphError(f"node {node.op_type} in domain {node.domain!r}")
        for function in model.functions.values():
            if function.domain != onnx_io.DOMAIN or dict(function.opset_imports) != {
                    "": onnx_io.OPSET}:
                raise StaticBudgetGraphError(f"function {function.identifier()} imports "
                                             f"{dict(function.opset_imports)}")
            if any(node.domain != "" for node in function):
                raise StaticBudgetGraphError(f"function {function.name} calls non-standard ops")

    def _check_io(self, model: ir.Model) -> None:
        graph = model.graph
        specs = onnx_io.cache_tensors(self.plan, self.max_context, self.arch.head_dim)
        head = [onnx_io.INPUT_IDS] + ([onnx_io.PAST_LENGTH] if self.kind == "decode" else [])
        cache_inputs = [spec.input_name for spec in specs] if self.kind == "decode" else []
        names = [value.name for value in graph.inputs]
        if names != head + cache_inputs:
            raise StaticBudgetGraphError(f"inputs {names[:6]}... are not {head} + the plan's "
                                         f"cache ({len(cache_inputs)} tensors)")
        names = [value.name for value in graph.outputs]
        if names != [onnx_io.LOGITS] + [spec.output_name for spec in specs]:
            raise StaticBudgetGraphError(f"outputs {names[:6]}... are not logits + the plan's "
                                         f"cache ({len(specs)} tensors)")
        by_name = {value.name: value for value in [*graph.inputs, *graph.outputs]}
        for spec in specs:
            for name in ([spec.input_name] if self.kind == "decode" else []) + [spec.output_name]:
                if _dims(by_name[name]) != _expected_shape(spec):
                    raise StaticBudgetGraphError(f"{name} has shape {_dims(by_name[name])}, "
                                                 f"expected the static {_expected_shape(spec)}")

    def _check_layers(self, model: ir.Model) -> None:
        graph = model.graph
        for node in graph:
            if node.domain == "" and node.op_type == "Attention":
                raise StaticBudgetGraphError("a standard Attention node remains")
            if node.op_type == "Concat" and any(
                    value is not None and value.is_graph_input() for value in node.inputs):
                raise StaticBudgetGraphError(f"Concat {node.name} grows a cache input")
        counts: dict[str, int] = {}
        for node in graph:
            if node.domain == onnx_io.DOMAIN:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
        expected = {op: n for op, n in self._expected_counts().items() if n}
        if counts != expected:
            raise StaticBudgetGraphError(f"kvcompile nodes {counts}, the plan needs {expected}")
        inputs = {value.name: value for value in graph.inputs}
        for value in graph.outputs[1:]:
            _, layer, part = value.name.split(".", 2)
            node = value.producer()
            wanted = self._writer(self.plan.layers[int(layer)], part)
            if node is None or node.op_type != wanted:
                raise StaticBudgetGraphError(f"{value.name} is written by "
                                             f"{None if node is None else node.op_type}, "
                                             f"not {wanted}")
            if self.kind == "decode":
                source = inputs[value.name.replace("present.", "past.", 1)]
                if source not in node.inputs:
                    raise StaticBudgetGraphError(f"{value.name} is not an update of "
                                                 f"{source.name}")

    def _expected_counts(self) -> dict[str, int]:
        """The ``kvcompile`` nodes the plan's layers need, by op type."""
        layers = self.plan.layers
        q_full = sum(layer.quantized_full for layer in layers)
        q_sel = sum(bool(layer.budgeted_heads) and onnx_io.quantized_selected(layer)
                    for layer in layers)
        budgeted = sum(bool(layer.budgeted_heads) for layer in layers)
        if self.kind == "prefill":
            return {ATTENTION: len(layers), COMPRESS_PREFILL: budgeted, QUANTIZE: q_full + q_sel}
        full = sum(bool(layer.full_heads) for layer in layers)
        return {ATTENTION: full - q_full + budgeted - q_sel, CACHE_UPDATE: budgeted,
                APPEND: q_full, QUANTIZED_ATTENTION: q_full + q_sel}

    def _writer(self, layer: LayerPlan, part: str) -> str:
        """The op that writes cache output ``part`` of ``layer`` (docs/ONNX.md)."""
        prefill = self.kind == "prefill"
        if part in onnx_io.FULL_PARTS:
            return "Pad" if prefill else "TensorScatter"
        if part in onnx_io.QUANTIZED_FULL_PARTS:
            if not prefill:
                return APPEND
            return "Pad" if part.endswith("_residual") else QUANTIZE
        if not onnx_io.quantized_selected(layer):
            return COMPRESS_PREFILL if prefill else CACHE_UPDATE
        if part in onnx_io.BUDGET_PARTS:  # the full-precision part of quantized selected slots
            if not prefill:
                return CACHE_UPDATE
            return "Mul" if part == "budget_counters" else "Gather"
        if not prefill:
            return "Identity"  # codes are written once, at prefill
        return "Gather" if part == "budget_selected_length" else QUANTIZE
