"""Names of the ONNX graphs' inputs and outputs (docs/ONNX.md), shared by build and runtime.

Two kinds of graphs carry the same model:

* the **source** graphs ``kvcompile build`` exports first: a standard decoder, every KV head
  in a fixed-size ``[B, Hkv, max_context, D]`` buffer per layer (``past_key.{i}`` in,
  ``present_key.{i}`` out);
* the **static-budget** graphs the passes rewrite them into, stored in the artifact: per layer
  a full-head buffer (``past.{i}.full_key`` ...) and a budgeted one with its slot bias and
  counters (``past.{i}.budget_key`` ...), the same state as ``kvcompile.runtime.cache``;
  a group the plan stores quantized holds its codes, float16 scales and zero points beside a
  full-precision part (``runtime/quant_cache.py``: the full heads' residual ring, the
  budgeted heads' sinks, compensation and window).

Torch-free on purpose: the onnxruntime backend and the example driver read these names.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvcompile.memory import COUNTER_BYTES, body_tokens, code_bytes, residual_tokens, scale_groups
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
CODE_PARTS = ("key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero")
"""A quantized group's six code tensors, after its ``full_`` / ``budget_`` prefix."""
QUANTIZED_FULL_PARTS = (*(f"full_{part}" for part in CODE_PARTS), "full_key_residual",
                        "full_value_residual")
QUANTIZED_BUDGET_PARTS = (*BUDGET_PARTS, *(f"budget_{part}" for part in CODE_PARTS),
                          "budget_selected_length")
ITEMSIZE = {"float32": 4, "float16": 2, "uint8": 1, "int64": 8}


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
    dtype: str  # one of ITEMSIZE

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (batch entry) of this tensor."""
        count = 1
        for d in self.shape[1:]:
            assert d is not None
            count *= d
        return count * ITEMSIZE[self.dtype]

    @property
    def input_name(self) -> str:
        return past(self.layer, self.part)

    @property
    def output_name(self) -> str:
        return present(self.layer, self.part)


def layer_cache_tensors(index: int, layer: LayerPlan, max_context: int,
                        head_dim: int) -> list[CacheTensor]:
    """The cache tensors of one layer, in graph order: the full group's, then the budgeted
    group's (a full-precision plan: full key/value, then the budgeted four)."""
    tensors = []
    if layer.full_heads:
        heads = len(layer.full_heads)
        if layer.quantized_full:
            storage = layer.full_storage
            body = body_tokens(storage, max_context)
            tensors += _code_tensors(index, "full", heads, body, body // storage.group, head_dim,
                                     layer)
            ring = (None, heads, residual_tokens(storage, max_context), head_dim)
            tensors += [CacheTensor(index, "full_key_residual", ring, "float32"),
                        CacheTensor(index, "full_value_residual", ring, "float32")]
        else:
            shape = (None, heads, max_context, head_dim)
            tensors += [CacheTensor(index, part, shape, "float32") for part in FULL_PARTS]
    if layer.budgeted_heads:
        assert layer.layout is not None
        heads, capacity = len(layer.budgeted_heads), layer.layout.capacity
        quantized = quantized_selected(layer)
        if quantized:
            capacity -= layer.layout.selected
        tensors += [
            CacheTensor(index, "budget_key", (None, heads, capacity, head_dim), "float32"),
            CacheTensor(index, "budget_value", (None, heads, capacity, head_dim), "float32"),
            CacheTensor(index, "budget_bias", (None, heads, capacity), "float32"),
            CacheTensor(index, "budget_counters", (None, 4), "int64"),
        ]
        if quantized:
            selected = layer.layout.selected
            tensors += _code_tensors(index, "budget", heads, selected,
                                     scale_groups(selected, layer.budget_storage.group),
                                     head_dim, layer)
            tensors.append(CacheTensor(index, "budget_selected_length", (None,), "int64"))
    return tensors


def quantized_selected(layer: LayerPlan) -> bool:
    """The layer's budgeted heads keep their selected slots as codes, as the torch cache
    allocates them (``LayerKV.allocate``: never in a sliding layer, which keeps its window)."""
    return layer.quantized_selected and not layer.sliding


def _code_tensors(index: int, group: str, heads: int, tokens: int, key_groups: int,
                  head_dim: int, layer: LayerPlan) -> list[CacheTensor]:
    """The six code tensors of ``tokens`` quantized slots (``runtime/quant.py``'s layout)."""
    storage = layer.full_storage if group == "full" else layer.budget_storage
    value_groups = scale_groups(head_dim, storage.group)
    shapes = {
        "key_codes": ((None, heads, tokens, code_bytes(head_dim, storage.key_bits)), "uint8"),
        "key_scale": ((None, heads, key_groups, head_dim), "float16"),
        "key_zero": ((None, heads, key_groups, head_dim), "float16"),
        "value_codes": ((None, heads, tokens, code_bytes(head_dim, storage.value_bits)), "uint8"),
        "value_scale": ((None, heads, tokens, value_groups), "float16"),
        "value_zero": ((None, heads, tokens, value_groups), "float16"),
    }
    return [CacheTensor(index, f"{group}_{part}", *shapes[part]) for part in CODE_PARTS]


def cache_tensors(plan: Plan, max_context: int, head_dim: int) -> list[CacheTensor]:
    """Every cache tensor of the static-budget graphs, layer by layer."""
    return [tensor for index, layer in enumerate(plan.layers)
            for tensor in layer_cache_tensors(index, layer, max_context, head_dim)]


def state_bytes(plan: Plan, tensors: list[CacheTensor]) -> int:
    """All KV state of one row, as ``kvcompile.memory.plan_state_bytes`` counts it: every cache
    tensor, plus one int64 length per layer with full heads (the graphs keep the full groups'
    length once, as ``past_length``, where the torch cache keeps one per layer)."""
    lengths = sum(bool(layer.full_heads) for layer in plan.layers)
    return sum(tensor.row_bytes for tensor in tensors) + lengths * COUNTER_BYTES
