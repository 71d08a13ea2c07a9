"""Names of the ONNX graphs' inputs and outputs (docs/ONNX.md), shared by build and runtime.

Two kinds of graphs carry the same model:

* the **source** graphs ``kvcompile build`` exports first: a standard decoder, every KV head
  in a fixed-size ``[B, Hkv, max_context, D]`` buffer per layer (``past_key.{i}`` in,
  ``present_key.{i}`` out);
* the **static-budget** graphs the passes rewrite them into, stored in the artifact: per layer
  a full-head buffer (``past.{i}.full_key`` ...) and a budgeted one with its slot bias and
  counters (``past.{i}.budget_key`` ...), the same state as ``kvcompile.runtime.cache``.

Torch-free on purpose: the onnxruntime backend and the example driver read these names.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvcompile.plan import LayerPlan, Plan

INPUT_IDS = "input_ids"
PAST_LENGTH = "past_length"
LOGITS = "logits"

ONNX_DIR = "onnx"
PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
WEIGHTS_FILE = "weights.onnx.data"  # external data shared by both graphs

DOMAIN = "kvcompile"
DOMAIN_VERSION = 1
OPSET = 24  # default-domain opset of every graph and function body

BATCH = "batch"  # the one symbolic dimension of the cache tensors

FULL_PARTS = ("full_key", "full_value")
BUDGET_PARTS = ("budget_key", "budget_value", "budget_bias", "budget_counters")


def source_past(kind: str, layer: int) -> str:
    """Source graph cache input, ``kind`` is ``key`` or ``value``."""
    return f"past_{kind}.{layer}"


def source_present(kind: str, layer: int) -> str:
    return f"present_{kind}.{layer}"


def past(layer: int, part: str) -> str:
    """Static-budget cache input: ``part`` is one of FULL_PARTS or BUDGET_PARTS."""
    return f"past.{layer}.{part}"


def present(layer: int, part: str) -> str:
    return f"present.{layer}.{part}"


@dataclass(frozen=True)
class CacheTensor:
    """One cache tensor of the static-budget graphs: its part name, layer and static shape
    (``None`` marks the batch dimension)."""

    layer: int
    part: str
    shape: tuple[int | None, ...]
    dtype: str  # "float32" | "int64"

    @property
    def input_name(self) -> str:
        return past(self.layer, self.part)

    @property
    def output_name(self) -> str:
        return present(self.layer, self.part)


def layer_cache_tensors(index: int, layer: LayerPlan, max_context: int,
                        head_dim: int) -> list[CacheTensor]:
    """The cache tensors of one layer, in graph order: full key/value, then the budgeted four."""
    tensors = []
    if layer.full_heads:
        shape = (None, len(layer.full_heads), max_context, head_dim)
        tensors += [CacheTensor(index, part, shape, "float32") for part in FULL_PARTS]
    if layer.budgeted_heads:
        assert layer.layout is not None
        heads, capacity = len(layer.budgeted_heads), layer.layout.capacity
        tensors += [
            CacheTensor(index, "budget_key", (None, heads, capacity, head_dim), "float32"),
            CacheTensor(index, "budget_value", (None, heads, capacity, head_dim), "float32"),
            CacheTensor(index, "budget_bias", (None, heads, capacity), "float32"),
            CacheTensor(index, "budget_counters", (None, 4), "int64"),
        ]
    return tensors


def cache_tensors(plan: Plan, max_context: int, head_dim: int) -> list[CacheTensor]:
    """Every cache tensor of the static-budget graphs, layer by layer."""
    return [tensor for index, layer in enumerate(plan.layers)
            for tensor in layer_cache_tensors(index, layer, max_context, head_dim)]
