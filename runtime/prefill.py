"""Prefill in chunks: a long prompt goes through the model a chunk at a time, so a server can
decode its other requests between chunks instead of stalling for the whole prompt.

Same math as a one-go prefill (exact causal attention over the whole prompt, then each
budgeted head compresses at the prompt's end): the chunks run through a staging cache that
keeps every head uncompressed, and the last chunk stores the whole prompt's keys and values
into the real cache, scored by its own queries (it holds at least the plan's observation
window). The staging cache is one uncompressed prompt's KV, held from the first chunk to the
last and then freed. Only the rounding differs from one go (chunked score matmuls), which is
why ``Engine.generate`` prefills through the same job: ``kvcompile run`` and a server give the
same tokens.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from kvcompile.plan import Plan
from kvcompile.runtime.cache import StaticKVCache

if TYPE_CHECKING:
    from kvcompile.runtime.engine import Engine

__all__ = ["PREFILL_CHUNK", "ChunkedPrefill", "chunk_bounds"]

PREFILL_CHUNK = 512
"""Prompt tokens per chunk: a decode step of the other requests waits for at most one chunk."""


def chunk_bounds(n_tokens: int, chunk: int, last_min: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each chunk of an ``n_tokens`` prompt: ``chunk`` tokens each, except
    the last, which holds at least ``min(last_min, n_tokens)``; ``chunk <= 0``: one chunk."""
    if n_tokens < 1:
        raise ValueError("a prompt has at least one token")
    if chunk <= 0 or n_tokens <= chunk:
        return [(0, n_tokens)]
    chunk = max(chunk, last_min)
    last = max(0, min(n_tokens - last_min, (n_tokens - 1) // chunk * chunk))
    bounds = [(start, min(start + chunk, last)) for start in range(0, last, chunk)]
    return [*bounds, (last, n_tokens)]


class ChunkedPrefill:
    """One prompt on its way into a cache (a :class:`~kvcompile.runtime.slots.PrefillJob`).

    :meth:`step` runs the next chunk that does not end the prompt; :meth:`finish` runs the
    last chunk and stores the prompt into a cache (one row, empty). A plan with
    sliding-window layers prefills in one go (their ring cannot take the whole prompt back).
    """

    def __init__(self, engine: Engine, prompt_ids: Sequence[int], chunk: int, plan: Plan) -> None:
        """``plan``: the plan of the cache the prompt goes into (its observation window)."""
        self.engine = engine
        self.ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
        sliding = any(layer.prefill_window for layer in plan.layers)
        self.bounds = chunk_bounds(len(prompt_ids), 0 if sliding else chunk,
                                   plan.selection.observation_window)
        self._next = 0
        self._staging: StaticKVCache | None = None

    @property
    def prompt_tokens(self) -> int:
        return self.ids.shape[1]

    def step(self) -> bool:
        if self._next >= len(self.bounds) - 1:
            return False
        start, stop = self.bounds[self._next]
        chunk = self.ids[:, start:stop]
        if self._staging is None:
            self._staging = self.engine.allocate(1, max_context=self.prompt_tokens,
                                                 plan=self.engine.uncompressed_plan())
            self.engine.prefill(chunk, [self._staging])
        else:
            self.engine.extend(chunk, self._staging)
        self._next += 1
        return True

    def finish(self, cache: StaticKVCache) -> torch.Tensor:
        """The last chunk, stored into the empty one-row ``cache``; the last logits ``[1, V]``."""
        if self._next != len(self.bounds) - 1:
            raise RuntimeError("finish() before every earlier chunk has run (step())")
        start, stop = self.bounds[-1]
        chunk = self.ids[:, start:stop]
        staging, self._staging = self._staging, None
        self._next += 1
        if staging is None:  # one chunk: the plain prefill
            return self.engine.prefill(chunk, [cache])
        return self.engine.prefill_last_chunk(chunk, staging, cache)
