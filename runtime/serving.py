"""Make the slot pool a server runs on: a loaded engine, a backend, and either a slot count or
a KV memory to divide by the plan's bytes per sequence."""
from __future__ import annotations

from typing import Any

from kvcompile.plan import Plan
from kvcompile.runtime.slots import PoolError, SlotPool, slots_for_memory

__all__ = ["open_pool"]


def open_pool(engine: Any, backend: str, *, slots: int | None = None,
              kv_memory: int | None = None, max_context: int | None = None,
              plan: Plan | None = None) -> SlotPool:
    """``slots`` rows, or as many as fit ``kv_memory`` bytes of KV at ``max_context`` tokens
    each (the engine's context by default). ``plan`` (torch only): serve another plan than
    the artifact's, e.g. ``engine.uncompressed_plan()`` as a baseline."""
    if (slots is None) == (kv_memory is None):
        raise PoolError("give either --slots or --kv-memory")
    if backend == "onnx":
        from kvcompile.runtime.onnx_pool import OnnxSlotPool, onnx_bytes_per_slot

        if plan is not None and plan != engine.plan:
            raise PoolError("the ONNX graphs serve only the artifact's plan; use --backend torch "
                            "for another plan")
        if max_context not in (None, engine.graph_context):
            raise PoolError(f"the ONNX graphs hold {engine.graph_context} tokens per slot; "
                            f"drop --max-context or rebuild with --max-context {max_context}")
        if slots is None:
            slots = slots_for_memory(kv_memory, onnx_bytes_per_slot(engine))
        return OnnxSlotPool(engine, slots)
    from kvcompile.runtime.torch_pool import TorchSlotPool, torch_bytes_per_slot

    context = max_context or engine.max_context
    if context > engine.max_context:
        raise PoolError(f"--max-context {context} exceeds the model's {engine.max_context}")
    if slots is None:
        slots = slots_for_memory(kv_memory, torch_bytes_per_slot(engine, context, plan))
    return TorchSlotPool(engine, slots, context, plan)
