"""Generation with static-budget KV buffers: prefill once, then one token at a time.

The engine owns the (head-permuted) compact model and the plan; caches are allocated with
fixed sizes on the model's device, so memory never grows with the number of generated
tokens. A decode step has the same shapes every time and reads nothing back to the host
(positions, lengths and counters live on the device), so on CUDA it is captured once as a
CUDA graph and replayed; prefill stays dynamic.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvcompile.plan import Plan
from kvcompile.runtime.cache import StaticKVCache
from kvcompile.runtime.generation import (
    Generation,
    check_extend,
    check_prefill,
    check_prompt,
    decode_loop,
    encode_prompt,
)
from kvcompile.runtime.generation import eos_ids as _eos_ids
from kvcompile.runtime.manifest import Manifest
from kvcompile.runtime.model import CompactLM
from kvcompile.runtime.prefill import PREFILL_CHUNK, ChunkedPrefill
from kvcompile.runtime.protocols import LayeredKVCache

CUDA_GRAPHS_ENV = "KVCOMPILE_CUDA_GRAPHS"  # "0" turns decode-step capture off (debugging)


class Engine:
    def __init__(self, model: CompactLM, plan: Plan, tokenizer: Any, max_context: int | None = None,
                 eos_token_ids: Sequence[int] = (), cuda_graphs: bool | None = None) -> None:
        self.model = model
        self.plan = plan
        self.tokenizer = tokenizer
        self.arch = model.arch
        self.max_context = max_context or self.arch.max_context
        self.eos_token_ids = tuple(eos_token_ids) or _eos_ids(tokenizer)
        self.manifest: Manifest | None = None  # set when loaded from an artifact
        self.buffer_context: int | None = None  # buffers are allocated for each request's context
        if cuda_graphs is None:
            cuda_graphs = os.environ.get(CUDA_GRAPHS_ENV, "1") != "0"
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._session: StaticKVCache | None = None
        self.prefill_chunk = PREFILL_CHUNK  # prompt tokens per prefill chunk (generate, serving)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- caches ---------------------------------------------------------------------------
    def allocate(self, batch: int = 1, max_context: int | None = None, plan: Plan | None = None) -> StaticKVCache:
        return StaticKVCache.allocate(
            plan or self.plan, batch, max_context or self.max_context, self.arch.head_dim,
            self.arch.group_size, dtype=self.model.dtype, device=self.device,
        )

    def uncompressed_plan(self) -> Plan:
        """Every head full (sliding layers keep the model's own window): the baseline."""
        return Plan.uncompressed(self.arch.n_layers, self.arch.n_kv_heads, self.arch.sliding_windows)

    # -- forward --------------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, caches: Sequence[LayeredKVCache]) -> torch.Tensor:
        """Exact causal prefill into one or more caches (same math, different storage).

        Returns the last position's logits [B, V]. Attention is computed once, by the first
        cache; the others only store (and compress) the same keys and values, each with its
        own plan's selection rule.
        """
        length = input_ids.shape[1]
        check_prefill(length, caches)
        scale = self.arch.attention_scale
        selections = [cache.plan.selection for cache in caches]

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = caches[0][i].prefill(q, k, v, scale, selections[0])
            for other, selection in zip(caches[1:], selections[1:], strict=True):
                other[i].store(q, k, v, scale, selection)
            return out

        with torch.no_grad():
            hidden = self.model.hidden_states(input_ids, torch.arange(length), attend,
                                              max_position=length - 1)
            logits = self.model.logits(hidden[:, -1])
        for cache in caches:
            cache.advance(length)
        return logits

    def prefill_last_chunk(self, input_ids: torch.Tensor, staging: StaticKVCache,
                           cache: StaticKVCache) -> torch.Tensor:
        """The last chunk of a prompt whose earlier chunks are in ``staging`` (uncompressed):
        exact attention through ``staging``, then the whole prompt stored (and compressed)
        into the empty ``cache``, scored by this chunk's queries. Last logits ``[B, V]``."""
        n_new = input_ids.shape[1]
        total = staging.length + n_new
        check_prefill(total, [cache])
        check_extend(staging, n_new)
        scale = self.arch.attention_scale
        selection = cache.plan.selection

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = staging[i].extend(q, k, v, scale)
            full = staging[i].full
            cache[i].store(q, full.k[:, :, :total], full.v[:, :, :total], scale, selection)
            return out

        with torch.no_grad():
            hidden = self.model.hidden_states(input_ids.to(self.device), staging.positions(n_new),
                                              attend, max_position=total - 1)
            logits = self.model.logits(hidden[:, -1])
        staging.advance(n_new)
        cache.advance(total)
        return logits

    def extend(self, input_ids: torch.Tensor, cache: LayeredKVCache,
               all_logits: bool = False) -> torch.Tensor:
        """Feed T new tokens through the static-budget cache; logits [B, T, V] or last [B, V]."""
        n_new = input_ids.shape[1]
        check_extend(cache, n_new)
        if n_new == 1 and not all_logits:
            return self.decode_step(input_ids, cache)
        return self._forward(input_ids.to(self.device), cache, all_logits)

    def _forward(self, input_ids: torch.Tensor, cache: LayeredKVCache,
                 all_logits: bool) -> torch.Tensor:
        """The cached forward pass: device work only (positions come from the cache)."""
        scale = self.arch.attention_scale

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return cache[i].extend(q, k, v, scale)

        n_new = input_ids.shape[1]
        with torch.no_grad():
            hidden = self.model.hidden_states(input_ids, cache.positions(n_new), attend,
                                              max_position=cache.max_context - 1)
            logits = self.model.logits(hidden if all_logits else hidden[:, -1])
        cache.advance(n_new)
        return logits

    def decode_step(self, token_ids: torch.Tensor, cache: LayeredKVCache) -> torch.Tensor:
        """One token per row (``[B, 1]``) -> logits ``[B, V]``; a CUDA graph replay on CUDA.

        The caller checks room (:meth:`extend` does). Every step has the same shapes, so the
        first step of a cache runs eagerly (warming up kernels and allocators), the second is
        captured, and later ones replay the capture.
        """
        token_ids = token_ids.to(self.device)
        if not self.cuda_graphs or not isinstance(cache, StaticKVCache):
            return self._forward(token_ids, cache, all_logits=False)
        graph = getattr(cache, "_decode_graph", None)
        if graph is None:
            graph = _DecodeGraph(self, cache)
            cache._decode_graph = graph  # dies with the cache: the graph holds no reference back
        return graph.step(self, cache, token_ids)

    # -- generation -----------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, chat)

    def session_cache(self, batch: int, tokens: int) -> StaticKVCache:
        """A cache for ``tokens`` tokens. With CUDA graphs one cache is kept and reset between
        requests, so its captured decode step is reused; it grows (to the next power of two,
        at most ``max_context``, recaptured once) when a request needs more room, so a short
        prompt never reserves the model's whole context."""
        if not self.cuda_graphs:
            return self.allocate(batch, max_context=tokens)
        session = self._session
        if session is None or session.batch != batch or session.max_context < tokens:
            self._session = session = None  # the old buffers go before the new ones come
            context = min(self.max_context, 1 << max(0, tokens - 1).bit_length())
            session = self._session = self.allocate(batch, max_context=context)
        session.reset()
        return session

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Greedy when temperature is 0, else temperature + nucleus sampling (seeded)."""
        ids = self.encode(prompt, chat) if isinstance(prompt, str) else list(prompt)
        check_prompt(ids, max_new_tokens, self.max_context)
        generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        cache = self.session_cache(1, len(ids) + max_new_tokens)
        job = ChunkedPrefill(self, ids, self.prefill_chunk, cache.plan)  # as a server prefills
        while job.step():
            pass
        generated, text, reason = decode_loop(
            job.finish(cache),
            lambda logits: sample(logits[0], temperature, top_p, generator),
            lambda token: self.extend(torch.tensor([[token]]), cache),
            self.tokenizer, self.eos_token_ids, max_new_tokens, on_text)
        return Generation(len(ids), generated, text, reason, cache.nbytes)


class _DecodeGraph:
    """The decode step of one cache as a CUDA graph (static input ids, static logits).

    It refers to neither the engine nor the cache (both are passed to :meth:`step`), so a
    dropped cache frees its buffers and the graph's memory pool at once, not at the next
    garbage collection.
    """

    def __init__(self, engine: Engine, cache: StaticKVCache) -> None:
        self.ids = torch.zeros(cache.batch, 1, dtype=torch.long, device=cache.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.warm = False  # one eager step has run
        self.failed = False  # capture refused: this cache decodes eagerly
        # the RoPE tables the graph gathers from must exist, at full size, before capture
        engine.model.rope_tables(torch.zeros(1, dtype=torch.long, device=cache.device),
                                 max_position=cache.max_context - 1)

    def step(self, engine: Engine, cache: StaticKVCache, token_ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(token_ids)
        if self.graph is None and self.warm and not self.failed:
            self._capture(engine, cache)
        if self.failed:
            return engine._forward(self.ids, cache, all_logits=False)
        if self.graph is None:  # the first step, eager on a side stream (lazy init happens here)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits = engine._forward(self.ids, cache, all_logits=False)
            torch.cuda.current_stream().wait_stream(stream)
            self.warm = True
            return logits
        self.graph.replay()
        for layer in cache.layers:  # the host-side counts the captured Python did not run
            layer.length += 1
        assert self.logits is not None
        return self.logits.clone()

    def _capture(self, engine: Engine, cache: StaticKVCache) -> None:
        """Record one step; recording runs no kernel, so only the host counts need undoing.

        A step that cannot be captured (an op that synchronises, say) decodes eagerly instead,
        with one warning: slower, never wrong.
        """
        host = [layer.length for layer in cache.layers]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits = engine._forward(self.ids, cache, all_logits=False)
        except RuntimeError as exc:
            self.failed = True
            self.logits = None
            warnings.warn(f"kvcompile: the decode step could not be captured as a CUDA graph "
                          f"({str(exc).splitlines()[0]}); decoding without graphs", stacklevel=3)
            return
        finally:
            for layer, length in zip(cache.layers, host, strict=True):
                layer.length = length
        self.graph = graph


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    logits = logits.cpu()
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))

