"""KV memory: the one definition used by the fit, the profile, ``inspect`` and build; eval
reports the bytes the runtime really allocates, which equal it (``tests/test_memory.py``).

A plan's buffers at context ``L`` hold ``Σ_layers (n_full·L + n_budgeted·C_layer)`` KV slots
(one token of one KV head), each ``2·d·bytes`` (key and value); on a sliding-window layer
``C_layer`` is at most ``L`` (``LayerPlan.kv_slots``). The reference is the cache the
source model itself allocates in transformers: ``Σ_layers n_kv_heads·L_layer`` slots with
``L_layer = min(L, window)`` on the model's own sliding-window layers and ``L`` elsewhere.

Which sliding cache counts: transformers' ``StaticSlidingWindowLayer`` allocates
``min(window, max_cache_len)`` tokens; ``DynamicSlidingWindowLayer`` keeps ``window - 1``
between steps and concatenates the new token to attend over ``window``. The reference is the
static allocation, the buffer a server reserves. The runtime's sliding ring buffers hold the
same ``min(window, max_context)`` tokens (the window includes the current token), so a plan
that keeps a sliding layer as the model runs it costs exactly what the model does.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvcompile.arch import ArchSpec
from kvcompile.plan import Plan
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


def slot_bytes(arch: ArchSpec, bytes_per_value: int) -> int:
    """Bytes of one KV slot: a key and a value of ``head_dim`` values."""
    return 2 * arch.head_dim * bytes_per_value


def uncompressed_bytes(arch: ArchSpec, context: int, bytes_per_value: int) -> int:
    return uncompressed_slots(arch, context) * slot_bytes(arch, bytes_per_value)


def plan_bytes(plan: Plan, arch: ArchSpec, context: int, bytes_per_value: int) -> int:
    """Bytes of the plan's buffers at ``context`` (what the runtime allocates for that context)."""
    return plan.kv_slots(context) * slot_bytes(arch, bytes_per_value)


def kv_ratio(plan: Plan, arch: ArchSpec, context: int) -> float:
    """The plan's KV memory over the source model's own cache, at ``context`` tokens."""
    return plan.kv_slots(context) / uncompressed_slots(arch, context)


def bytes_ratio(kv_bytes: int, uncompressed: int) -> float:
    """The memory ratio of two measured sizes: KV bytes over the uncompressed cache's (eval
    reports and the gate's memory rule, from the bytes the runtime allocates)."""
    if uncompressed <= 0:
        raise ValueError(f"the uncompressed cache must have a positive size, got {uncompressed} bytes")
    return kv_bytes / uncompressed


def memory_table(plan: Plan, arch: ArchSpec, bytes_per_value: int, extra: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Plan bytes next to the source model's own cache at several context lengths."""
    contexts = sorted({c for c in TABLE_CONTEXTS if c <= arch.max_context} | set(extra))
    rows = []
    for context in contexts:
        kv = plan_bytes(plan, arch, context, bytes_per_value)
        full = uncompressed_bytes(arch, context, bytes_per_value)
        rows.append({"context": context, "kv_bytes": kv, "uncompressed_bytes": full,
                     "ratio": rounded(kv / full, 4)})
    return rows
