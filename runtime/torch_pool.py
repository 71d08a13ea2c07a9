"""The torch runtime's slot pool (:class:`~kvcompile.runtime.slots.SlotPool`).

One :class:`StaticKVCache` of ``slots`` rows is allocated once. A decode step runs the active
prefix as a cache of views (``cache.rows(0, n)``, made once per size, so on CUDA each size
captures its own decode graph once); rows hold sequences of different lengths (per-row
positions, full-head lengths and budgeted counters); a freed row takes the last active row's
state. Prompts are prefilled in chunks (:class:`~kvcompile.runtime.prefill.ChunkedPrefill`),
exactly as ``Engine.generate`` prefills them.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvcompile.memory import plan_state_bytes
from kvcompile.plan import Plan
from kvcompile.runtime.cache import StaticKVCache
from kvcompile.runtime.engine import Engine
from kvcompile.runtime.prefill import ChunkedPrefill
from kvcompile.runtime.slots import PoolError

__all__ = ["TorchSlotPool", "torch_bytes_per_slot"]


def torch_bytes_per_slot(engine: Engine, max_context: int, plan: Plan | None = None) -> int:
    """KV bytes of one slot (all its KV state, ``kvcompile.memory``) for ``plan`` at
    ``max_context``, before any allocation: what ``--kv-memory`` is divided by."""
    itemsize = torch.empty((), dtype=engine.model.dtype).element_size()
    return plan_state_bytes(plan or engine.plan, engine.arch.head_dim, max_context, itemsize)


class TorchSlotPool:
    def __init__(self, engine: Engine, slots: int, max_context: int | None = None,
                 plan: Plan | None = None) -> None:
        if slots < 1:
            raise PoolError(f"a pool needs at least one slot, got {slots}")
        self.engine = engine
        self.plan = plan or engine.plan
        self.cache = engine.allocate(slots, max_context or engine.max_context, plan=self.plan)
        self._lengths = [0] * slots  # host-side tokens of each row
        self._active = 0
        self._prefixes: dict[int, StaticKVCache] = {}
        self._rows: dict[int, StaticKVCache] = {}

    @property
    def slots(self) -> int:
        return self.cache.batch

    @property
    def active(self) -> int:
        return self._active

    @property
    def max_context(self) -> int:
        return self.cache.max_context

    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes

    @property
    def bytes_per_slot(self) -> int:
        return self.cache.nbytes // self.slots

    def begin(self, prompt_ids: Sequence[int]) -> ChunkedPrefill:
        if not 0 < len(prompt_ids) <= self.max_context:
            raise PoolError(f"a prompt of {len(prompt_ids)} tokens does not fit a slot of "
                            f"{self.max_context}")
        return ChunkedPrefill(self.engine, prompt_ids, self.engine.prefill_chunk, self.plan)

    def finish(self, job: ChunkedPrefill) -> np.ndarray:
        row = self._active
        if row >= self.slots:
            raise PoolError("every slot is taken; release one first")
        cache = self._rows.get(row)
        if cache is None:
            cache = self._rows[row] = self.cache.rows(row, row + 1)
        cache.reset()
        logits = job.finish(cache)
        self._lengths[row] = job.prompt_tokens
        self._active += 1
        return _numpy(logits[0])

    def decode(self, token_ids: Sequence[int]) -> np.ndarray:
        n = self._active
        if len(token_ids) != n or n == 0:
            raise PoolError(f"decode needs one token for each of the {n} active rows, got "
                            f"{len(token_ids)}")
        view = self._prefixes.get(n)
        if view is None:
            view = self._prefixes[n] = self.cache.rows(0, n)
        view.set_length(max(self._lengths[:n]))
        ids = torch.tensor(list(token_ids), dtype=torch.long)[:, None]
        logits = self.engine.extend(ids, view)
        for row in range(n):
            self._lengths[row] += 1
        return _numpy(logits)

    def release(self, row: int) -> int | None:
        last = self._active - 1
        if not 0 <= row <= last:
            raise PoolError(f"row {row} is not active (active rows: {self._active})")
        self._active = last
        if row == last:
            self._lengths[row] = 0
            return None
        self.cache.copy_row(last, row)
        self._lengths[row], self._lengths[last] = self._lengths[last], 0
        return last


def _numpy(logits: torch.Tensor) -> np.ndarray:
    return logits.detach().float().cpu().numpy()
