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

from kvcompile.errors import ContextLengthError
from kvcompile.plan import Plan
from kvcompile.runtime.cache import StaticKVCache
from kvcompile.runtime.generation import Generation, encode_prompt
from kvcompile.runtime.generation import eos_ids as _eos_ids
from kvcompile.runtime.model import CompactLM

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
        self.manifest: dict[str, Any] | None = None  # set when loaded from an artifact
        if cuda_graphs is None:
            cuda_graphs = os.environ.get(CUDA_GRAPHS_ENV, "1") != "0"
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._session: StaticKVCache | None = None

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
    def prefill(self, input_ids: torch.Tensor, caches: Sequence[Any]) -> torch.Tensor:
        """Exact causal prefill into one or more caches (same math, different storage).

        Returns the last position's logits [B, V]. Attention is computed once, by the first
        cache; the others only store (and compress) the same keys and values, each with its
        own plan's selection rule.
        """
        length = input_ids.shape[1]
        for cache in caches:
            if length > cache.max_context:
                raise ContextLengthError(
                    f"the prompt has {length} tokens, more than the context of {cache.max_context}; "
                    f"shorten it or allocate a larger context"
                )
            if cache.length:
                raise ValueError("prefill needs empty caches; call reset() first")
        scale = self.arch.attention_scale
        selections = [(cache.plan.selection, cache.plan.observation_window) for cache in caches]

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = caches[0][i].prefill(q, k, v, scale, *selections[0])
            for other, selection in zip(caches[1:], selections[1:], strict=True):
                other[i].store(q, k, v, scale, *selection)
            return out

        with torch.no_grad():
            hidden = self.model.hidden_states(input_ids, torch.arange(length), attend,
                                              max_position=length - 1)
            logits = self.model.logits(hidden[:, -1])
        for cache in caches:
            cache.advance(length)
        return logits

    def extend(self, input_ids: torch.Tensor, cache: Any, all_logits: bool = False) -> torch.Tensor:
        """Feed T new tokens through the static-budget cache; logits [B, T, V] or last [B, V]."""
        n_new = input_ids.shape[1]
        start = cache.length
        if start + n_new > cache.max_context:
            raise ContextLengthError(
                f"{start} cached + {n_new} new tokens exceed the context of {cache.max_context}; "
                f"generate fewer tokens or use a shorter prompt"
            )
        if n_new == 1 and not all_logits:
            return self.decode_step(input_ids, cache)
        return self._forward(input_ids.to(self.device), cache, all_logits)

    def _forward(self, input_ids: torch.Tensor, cache: Any, all_logits: bool) -> torch.Tensor:
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

    def decode_step(self, token_ids: torch.Tensor, cache: Any) -> torch.Tensor:
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
            cache._decode_graph = graph  # lives and dies with the cache's buffers
        return graph.step(token_ids)

    # -- generation -----------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, chat)

    def session_cache(self, batch: int, tokens: int) -> StaticKVCache:
        """A cache for ``tokens`` tokens. With CUDA graphs one cache of ``max_context`` slots
        is kept and reset between requests, so its captured decode step is reused."""
        if not self.cuda_graphs:
            return self.allocate(batch, max_context=tokens)
        if self._session is None or self._session.batch != batch:
            self._session = self.allocate(batch, max_context=self.max_context)
        self._session.reset()
        return self._session

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
        if not ids:
            raise ContextLengthError("the prompt is empty")
        if len(ids) + max_new_tokens > self.max_context:
            raise ContextLengthError(
                f"prompt ({len(ids)} tokens) + max new tokens ({max_new_tokens}) exceed the context "
                f"of {self.max_context}; shorten the prompt or lower --max-new-tokens"
            )
        generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        cache = self.session_cache(1, len(ids) + max_new_tokens)
        logits = self.prefill(torch.tensor([ids]), [cache])
        generated: list[int] = []
        printed = ""
        reason = "max_tokens"
        for _ in range(max_new_tokens):
            token = sample(logits[0], temperature, top_p, generator)
            if token in self.eos_token_ids:
                reason = "eos"
                break
            generated.append(token)
            if on_text is not None:
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                if len(text) > len(printed) and not text.endswith("\ufffd"):
                    on_text(text[len(printed):])
                    printed = text
            if len(generated) == max_new_tokens:
                break
            logits = self.extend(torch.tensor([[token]]), cache)
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        if on_text is not None and len(text) > len(printed):
            on_text(text[len(printed):])
        return Generation(len(ids), generated, text, reason, cache.nbytes)


class _DecodeGraph:
    """The decode step of one cache as a CUDA graph (static input ids, static logits)."""

    def __init__(self, engine: Engine, cache: StaticKVCache) -> None:
        self.engine = engine
        self.cache = cache
        self.ids = torch.zeros(cache.batch, 1, dtype=torch.long, device=cache.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.warm = False  # one eager step has run
        self.failed = False  # capture refused: this cache decodes eagerly
        # the RoPE tables the graph gathers from must exist, at full size, before capture
        engine.model.rope_tables(torch.zeros(1, dtype=torch.long, device=cache.device),
                                 max_position=cache.max_context - 1)

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        self.ids.copy_(token_ids)
        if self.graph is None and self.warm and not self.failed:
            self._capture()
        if self.graph is None:  # eager: the first step (lazy init happens here) or no capture
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits = self.engine._forward(self.ids, cache, all_logits=False)
            torch.cuda.current_stream().wait_stream(stream)
            self.warm = True
            return logits
        self.graph.replay()
        for layer in cache.layers:  # the host-side counts the captured Python did not run
            layer.length += 1
        assert self.logits is not None
        return self.logits.clone()

    def _capture(self) -> None:
        """Record one step; recording runs no kernel, so only the host counts need undoing.

        A step that cannot be captured (an op that synchronises, say) decodes eagerly instead,
        with one warning: slower, never wrong.
        """
        cache = self.cache
        host = [layer.length for layer in cache.layers]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits = self.engine._forward(self.ids, cache, all_logits=False)
        except RuntimeError as exc:
            self.failed = True
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

