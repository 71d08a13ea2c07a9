"""A pool of cache slots: what the continuous-batching scheduler asks of a backend.

A pool allocates ``slots`` rows of one static-budget cache once, up front. Requests occupy
rows ``0 .. active - 1`` (the pool keeps them packed: a freed row takes the last active row's
contents), so a decode step runs on a prefix of the buffers (views, no copy) and costs what
the active rows cost. A prompt is prefilled by a :class:`PrefillJob`, in chunks where the
backend can, and lands in row ``active`` on its last chunk.

Torch-free: the scheduler and the onnxruntime pool see logits as numpy arrays.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from kvcompile.errors import KVCompileError

__all__ = ["PoolError", "PrefillJob", "SlotPool", "format_bytes", "parse_bytes", "slots_for_memory"]


class PoolError(KVCompileError):
    """A pool that cannot be made as asked (no slot fits the memory, a bad size)."""


class PrefillJob(Protocol):
    """One prompt on its way into a slot."""

    @property
    def prompt_tokens(self) -> int: ...

    def step(self) -> bool:
        """Run the next chunk that does not finish the prompt; False when only the last
        chunk is left (then call :meth:`SlotPool.finish`)."""


class SlotPool(Protocol):
    """``slots`` rows of one cache, allocated once; rows ``0 .. active - 1`` hold requests."""

    @property
    def slots(self) -> int: ...

    @property
    def active(self) -> int:
        """Rows holding a request (the first ``active`` rows)."""

    @property
    def max_context(self) -> int:
        """Tokens one slot holds: prompt plus generated."""

    @property
    def kv_bytes(self) -> int:
        """KV state of all slots as allocated (``memory.plan_state_bytes`` at the compute dtype x slots)."""

    @property
    def bytes_per_slot(self) -> int: ...

    def begin(self, prompt_ids: Sequence[int]) -> PrefillJob:
        """Start prefilling a prompt; it takes no slot until :meth:`finish`."""

    def finish(self, job: PrefillJob) -> np.ndarray:
        """Run the job's last chunk into row ``active`` (which becomes active); return the
        last position's logits ``[V]`` (float32)."""

    def decode(self, token_ids: Sequence[int]) -> np.ndarray:
        """One token for each active row (``len(token_ids) == active``); logits ``[active, V]``."""

    def release(self, row: int) -> int | None:
        """Free ``row``; the last active row moves into it. Returns that row's old index (the
        caller renumbers its request), or None when ``row`` was the last."""


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12,
          "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"2GiB"``, ``"256 MiB"``, ``"1.5GB"``, ``"4096"`` -> bytes."""
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise PoolError(f"cannot read {text!r} as a memory size; write e.g. 2GiB, 512MiB or "
                        f"1.5GB")
    return int(value * _UNITS[unit])


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units, one decimal (whole bytes below 1 KiB)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def slots_for_memory(kv_memory: int, bytes_per_slot: int) -> int:
    """How many slots of ``bytes_per_slot`` fit in ``kv_memory`` bytes (at least one, or an
    error that names both numbers)."""
    slots = kv_memory // bytes_per_slot
    if slots < 1:
        raise PoolError(f"--kv-memory {kv_memory} bytes holds no slot: one sequence needs "
                        f"{bytes_per_slot} bytes at this --max-context; give more memory or a "
                        f"shorter context")
    return int(slots)
