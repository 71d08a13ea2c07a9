"""KV memory: the one definition used by the fit, the profile, ``inspect`` and build; eval
reports the bytes the runtime really allocates, which equal it (``tests/test_memory.py``).
Every memory ratio that is printed, stored or checked is :func:`memory_ratio`.

Memory is counted in **bytes**: everything a plan's KV state holds for one sequence at context
``L`` (:func:`plan_bytes`) — full-precision keys and values (full heads' ``L`` tokens, or their
quantized body plus a residual ring; budgeted heads' sinks, compensation and window), codes,
float16 scales and zero points, the float32 slot bias and the int64 counters — over the bytes
of the source model's own cache at ``L`` (:func:`uncompressed_bytes`): ``Σ_layers
n_kv_heads·L_layer`` slots of ``2·d`` values with ``L_layer = min(L, window)`` on the model's
own sliding-window layers and ``L`` elsewhere. Both sides count full-precision values at the
baseline dtype's bytes, bfloat16 (2) unless ``--baseline-dtype`` says otherwise, whatever dtype
a run computes in. A plan's slots (``LayerPlan.kv_slots``: tokens x heads) still count what
it can attend to.

Which sliding cache counts: transformers' ``StaticSlidingWindowLayer`` allocates
``min(window, max_cache_len)`` tokens; ``DynamicSlidingWindowLayer`` keeps ``window - 1``
between steps and concatenates the new token to attend over ``window``. The reference is the
static allocation, the buffer a server reserves. The runtime's sliding ring buffers hold the
same ``min(window, max_context)`` tokens (the window includes the current token), so a plan
that keeps a sliding layer as the model runs it holds the model's keys and values, plus its
float32 slot bias and counters (about 1.6% more at head dim 64 in bfloat16).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from kvcompile.arch import ArchSpec
from kvcompile.plan import LayerPlan, Plan, Storage
from kvcompile.yamlio import rounded

TABLE_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)


def layer_tokens(window: int | None, context: int) -> int:
    """Tokens per KV head that the source model caches in one layer at ``context``."""
    return min(context, window) if window else context


def uncompressed_slots(arch: ArchSpec, context: int) -> int:
    """KV slots of the source model's own cache at ``context`` tokens (sliding layers: their window)."""
    return sum(arch.n_kv_heads * layer_tokens(window, context) for window in arch.sliding_windows)


def sliding_slots(arch: ArchSpec, context: int) -> int:
    """The part of :func:`uncompressed_slots` in the model's sliding-window layers."""
    return sum(arch.n_kv_heads * layer_tokens(window, context) for window in arch.sliding_windows if window)


BASELINE_DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}
"""Dtypes a ratio may be counted against, with their bytes per value; bfloat16 is the default
(the cache a server holds), so fp32 CPU runs never count fp32 -> bf16 as compression."""
BASELINE_BYTES = BASELINE_DTYPES["bfloat16"]
BIAS_BYTES = 4  # the float32 logit bias of each full-precision budgeted slot (runtime/cache.py)
COUNTER_BYTES = 8  # int64 lengths and counters


def baseline_bytes_per_value(dtype: str) -> int:
    """Bytes per value of ``--baseline-dtype``; one line naming the choices otherwise."""
    if dtype not in BASELINE_DTYPES:
        raise ValueError(f"baseline dtype must be one of {sorted(BASELINE_DTYPES)}, got {dtype!r}")
    return BASELINE_DTYPES[dtype]


def baseline_note(dtype: str) -> str:
    """What to print beside a ratio: nothing at bfloat16 (the default), `` (vs float32)``
    otherwise, so a ratio is never read against the wrong baseline."""
    baseline_bytes_per_value(dtype)
    return "" if dtype == "bfloat16" else f" (vs {dtype})"


def slot_bytes(arch: ArchSpec, bytes_per_value: int) -> int:
    """Bytes of one full-precision KV slot: a key and a value of ``head_dim`` values."""
    return 2 * arch.head_dim * bytes_per_value


def code_bytes(head_dim: int, bits: int) -> int:
    """Bytes of one token's codes in one head (4-bit codes two per byte, an odd tail padded)."""
    return math.ceil(head_dim * bits / 8)


def scale_groups(n: int, group: int) -> int:
    """Groups of ``group`` entries covering ``n`` (a last partial group counts whole)."""
    return -(-n // group)


def quantized_tokens_bytes(storage: Storage, tokens: int, key_groups: int, head_dim: int) -> int:
    """One head's quantized ``tokens``: key and value codes, the keys' float16 scale and zero
    per channel for each of ``key_groups`` token groups, the values' per token and channel group."""
    codes = tokens * (code_bytes(head_dim, storage.key_bits) + code_bytes(head_dim, storage.value_bits))
    key_scales = key_groups * head_dim * 2 * 2
    value_scales = tokens * scale_groups(head_dim, storage.group) * 2 * 2
    return codes + key_scales + value_scales


def residual_tokens(storage: Storage, context: int) -> int:
    """Full-precision residual ring of a quantized full group: one key group, at most ``context``."""
    return min(storage.group, context)


def body_tokens(storage: Storage, context: int) -> int:
    """Tokens a quantized full group holds as codes: whole groups only (the rest is residual)."""
    return (context // storage.group) * storage.group


def full_group_bytes(storage: Storage, n_heads: int, context: int, head_dim: int,
                     bytes_per_value: int) -> int:
    """Full heads, one sequence: every token (codes + residual ring when quantized) + a length."""
    if n_heads == 0:
        return 0
    if not storage.quantized:
        per_head = context * 2 * head_dim * bytes_per_value
    else:
        body = body_tokens(storage, context)
        per_head = (quantized_tokens_bytes(storage, body, body // storage.group, head_dim)
                    + residual_tokens(storage, context) * 2 * head_dim * bytes_per_value)
    return n_heads * per_head + COUNTER_BYTES


def budget_group_bytes(layer: LayerPlan, context: int, head_dim: int, bytes_per_value: int) -> int:
    """Budgeted heads, one sequence: full-precision slots with their bias, quantized selected
    slots (when the layer's budget storage is quantized), 4 counters (+ a selected length)."""
    if not layer.budgeted_heads:
        return 0
    assert layer.layout is not None
    lay = layer.layout
    fp_slots = min(lay.capacity, context) if layer.sliding else lay.capacity
    per_head = 0
    counters = 4
    if layer.quantized_selected:
        fp_slots -= lay.selected
        per_head = quantized_tokens_bytes(layer.budget_storage, lay.selected,
                                          scale_groups(lay.selected, layer.budget_storage.group),
                                          head_dim)
        counters += 1
    bias = max(BIAS_BYTES, bytes_per_value)  # float32, float64 beside float64 values
    per_head += fp_slots * (2 * head_dim * bytes_per_value + bias)
    return len(layer.budgeted_heads) * per_head + counters * COUNTER_BYTES


def layer_bytes(layer: LayerPlan, context: int, head_dim: int, bytes_per_value: int) -> int:
    """All bytes of one layer's KV state for one sequence at ``context``: what the runtime
    allocates (``StaticKVCache.nbytes`` per row) and what every ratio counts."""
    return (full_group_bytes(layer.full_storage, len(layer.full_heads), context, head_dim,
                             bytes_per_value)
            + budget_group_bytes(layer, context, head_dim, bytes_per_value))


def uncompressed_bytes(arch: ArchSpec, context: int, bytes_per_value: int = BASELINE_BYTES) -> int:
    """The source model's own cache at ``context`` (keys and values, nothing else)."""
    return uncompressed_slots(arch, context) * slot_bytes(arch, bytes_per_value)


def plan_bytes(plan: Plan, arch: ArchSpec, context: int, bytes_per_value: int = BASELINE_BYTES) -> int:
    """All bytes of the plan's KV state for one sequence at ``context``: full-precision regions
    at ``bytes_per_value``, codes, scales and zero points, biases and counters."""
    return plan_state_bytes(plan, arch.head_dim, context, bytes_per_value)


def plan_state_bytes(plan: Plan, head_dim: int, context: int, bytes_per_value: int) -> int:
    """:func:`plan_bytes` from the head dim alone (the runtime has no ``ArchSpec``)."""
    return sum(layer_bytes(layer, context, head_dim, bytes_per_value) for layer in plan.layers)


def memory_ratio(kv_bytes: int, baseline_bytes: int) -> float:
    """The memory ratio, the one definition: a plan's KV bytes over the baseline's, both at
    the same context (``kv_memory.ratio``, ``memory_ratio``, the memory table's ``ratio``, the
    gate's ``max_memory_ratio``). The baseline is the source model's cache in bfloat16 unless
    ``--baseline-dtype`` says otherwise, and the plan's full-precision parts count at the
    same bytes per value, so a float32 run is never counted as compression.
    """
    if baseline_bytes <= 0:
        raise ValueError(f"baseline KV memory must be positive, got {baseline_bytes}")
    return kv_bytes / baseline_bytes


def plan_memory_ratio(plan: Plan, arch: ArchSpec, context: int,
                      bytes_per_value: int = BASELINE_BYTES) -> float:
    """:func:`memory_ratio` of the plan's KV state over the source model's own cache at ``context``."""
    return memory_ratio(plan_bytes(plan, arch, context, bytes_per_value),
                        uncompressed_bytes(arch, context, bytes_per_value))


def budget_bytes(arch: ArchSpec, context: int, kv_budget: float,
                 bytes_per_value: int = BASELINE_BYTES) -> int:
    """The fit's target in bytes: ``--kv-budget`` of the source model's cache at ``context``."""
    return math.floor(kv_budget * uncompressed_bytes(arch, context, bytes_per_value))


def group_bits_per_value(layer: LayerPlan, group: str, context: int, head_dim: int,
                         bytes_per_value: int = BASELINE_BYTES) -> float | None:
    """Stored bits per key or value of one layer's ``"full"`` or ``"budgeted"`` group, over the
    tokens it holds at ``context`` (codes, scales, full-precision parts, bias, counters);
    ``None`` for an empty group."""
    if group == "full":
        heads = len(layer.full_heads)
        nbytes = full_group_bytes(layer.full_storage, heads, context, head_dim, bytes_per_value)
        tokens = context
    elif group == "budgeted":
        heads = len(layer.budgeted_heads)
        nbytes = budget_group_bytes(layer, context, head_dim, bytes_per_value)
        assert layer.layout is not None or not heads
        tokens = 0 if not heads else (min(layer.layout.capacity, context) if layer.sliding
                                      else layer.layout.capacity)
    else:
        raise ValueError(f"group must be 'full' or 'budgeted', got {group!r}")
    if not heads or not tokens:
        return None
    return nbytes * 8 / (heads * tokens * 2 * head_dim)


def plan_bits_per_value(plan: Plan, context: int, head_dim: int,
                        bytes_per_value: int = BASELINE_BYTES) -> float:
    """All the plan's bytes over every value it holds at ``context``, in bits."""
    values = sum(layer.kv_slots(context) for layer in plan.layers) * 2 * head_dim
    return plan_state_bytes(plan, head_dim, context, bytes_per_value) * 8 / max(1, values)


def budget_slots(arch: ArchSpec, context: int, kv_budget: float) -> int:
    """``--kv-budget`` of the source model's cache at ``context`` in full-precision slots,
    rounded down (the fit's starting point before it counts bytes)."""
    return math.floor(kv_budget * uncompressed_slots(arch, context))


def memory_table(plan: Plan, arch: ArchSpec, bytes_per_value: int = BASELINE_BYTES,
                 extra: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Plan bytes next to the source model's own cache at several context lengths."""
    contexts = sorted({c for c in TABLE_CONTEXTS if c <= arch.max_context} | set(extra))
    rows = []
    for context in contexts:
        kv = plan_bytes(plan, arch, context, bytes_per_value)
        full = uncompressed_bytes(arch, context, bytes_per_value)
        rows.append({"context": context, "kv_bytes": kv, "uncompressed_bytes": full,
                     "ratio": rounded(memory_ratio(kv, full), 4)})
    return rows
