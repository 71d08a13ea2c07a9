"""Permute every layer's KV heads in the exported initializers: full heads first.

The ONNX twin of the torch ``compile_model`` (same row order, ``plan.head_rows``): q/k/v
output rows (and biases) and ``o_proj`` input columns move, so the graph computes the same
function with each layer's full heads in the leading slots, as the static-budget cache wants.
Weights are found by their checkpoint names (the exporter keeps them); the layout of each
([out, in] behind a Transpose, or [in, out] fed to MatMul) is read from its consumer.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kvcompile.arch import ArchSpec
from kvcompile.plan import HeadOrder, Plan, head_rows

PERMUTED_KEY = "kvcompile.heads_permuted"  # model metadata: weights in the plan's served order


def _feature_axes(weight: ir.Value) -> tuple[int, int]:
    """(output-feature axis, input-feature axis) of a 2-D weight, from how it is consumed."""
    layouts = set()
    for use in weight.uses():
        node = use.node
        if node.op_type == "Transpose" and node.domain == "":
            perm = node.attributes.get_ints("perm", None)
            if perm is not None and tuple(perm) == (1, 0):
                layouts.add((0, 1))
                continue
        elif node.op_type == "MatMul" and use.idx == 1:
            layouts.add((1, 0))
            continue
        elif node.op_type == "Gemm" and use.idx == 1:
            layouts.add((0, 1) if node.attributes.get_int("transB", 0) else (1, 0))
            continue
        raise ir.passes.PreconditionError(
            f"weight {weight.name} is used by {node.op_type} input {use.idx}: cannot tell its layout")
    if len(layouts) != 1:
        raise ir.passes.PreconditionError(f"weight {weight.name} has no single layout: {layouts}")
    return layouts.pop()


def _take(graph: ir.Graph, name: str, rows: np.ndarray, axis: int) -> None:
    value = graph.initializers[name]
    array = value.const_value.numpy()
    value.const_value = ir.tensor(np.ascontiguousarray(np.take(array, rows, axis=axis)),
                                  name=name)


class PermuteKVHeads(ir.passes.InPlacePass):
    """Reorder every layer's KV heads as the source-order plan's ``LayerPlan.permutation`` says."""

    def __init__(self, plan: Plan, arch: ArchSpec) -> None:
        super().__init__()
        self.plan = plan
        self.arch = arch

    def _names(self, layer: int) -> dict[str, str]:
        prefix = f"model.layers.{layer}.self_attn."
        return {proj: f"{prefix}{proj}" for proj in ("q_proj", "k_proj", "v_proj", "o_proj")}

    def requires(self, model: ir.Model) -> None:
        if model.metadata_props.get(PERMUTED_KEY) == "true":
            raise ir.passes.PreconditionError("the KV heads are already permuted")
        if self.plan.order is not HeadOrder.SOURCE:
            raise ir.passes.PreconditionError(
                f"the plan is in {self.plan.order.value} order; the source graph is permuted by the "
                f"source-order plan (the profile's)")
        if len(self.plan.layers) != self.arch.n_layers:
            raise ir.passes.PreconditionError(
                f"the plan has {len(self.plan.layers)} layers, the model {self.arch.n_layers}")
        for index in range(self.arch.n_layers):
            for proj, name in self._names(index).items():
                if f"{name}.weight" not in model.graph.initializers:
                    raise ir.passes.PreconditionError(f"no initializer {name}.weight ({proj})")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        arch, graph = self.arch, model.graph
        modified = False
        for index, layer in enumerate(self.plan.layers):
            order = layer.permutation
            if order == tuple(range(arch.n_kv_heads)):
                continue
            q_rows = np.array(head_rows(order, arch.group_size, arch.head_dim), dtype=np.int64)
            kv_rows = np.array(head_rows(order, 1, arch.head_dim), dtype=np.int64)
            names = self._names(index)
            for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                weight = f"{names[proj]}.weight"
                _take(graph, weight, rows, _feature_axes(graph.initializers[weight])[0])
                if f"{names[proj]}.bias" in graph.initializers:
                    _take(graph, f"{names[proj]}.bias", rows, 0)
            weight = f"{names['o_proj']}.weight"
            _take(graph, weight, q_rows, _feature_axes(graph.initializers[weight])[1])
            modified = True
        model.metadata_props[PERMUTED_KEY] = "true"
        return ir.passes.PassResult(model, modified)
