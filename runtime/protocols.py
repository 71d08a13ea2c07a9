"""What every engine and every cache offers, whichever backend computes: the interface that
``generate``, ``kvcompile eval`` and the build's parity checks are written against.

Engines: :class:`kvcompile.runtime.engine.Engine` (torch), :class:`~kvcompile.runtime.onnx_backend.OnnxEngine`
(onnxruntime) and :class:`kvcompile.eval.backends.OnnxBesideTorch` (the artifact in
onnxruntime, other plans in torch). Caches: :class:`~kvcompile.runtime.cache.StaticKVCache`,
:class:`~kvcompile.runtime.onnx_backend.OnnxCache` and
:class:`~kvcompile.runtime.head_order.ReorderedCache`. ``tests/test_protocols.py`` checks that
each one has every member below with a compatible call signature.

An engine takes back only the caches its own :meth:`Engine.allocate` returned; logits are the
backend's arrays (torch tensors, numpy arrays for ``OnnxEngine``). Torch-free, so the
onnxruntime backend shares these definitions.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kvcompile.plan import Plan
    from kvcompile.runtime.generation import Generation
    from kvcompile.runtime.manifest import Manifest


class KVCache(Protocol):
    """One request's static-budget cache: allocated once, sized for ``max_context`` tokens."""

    @property
    def plan(self) -> Plan:
        """The plan the buffers were allocated for."""

    @property
    def length(self) -> int:
        """Tokens fed so far (the longest row's, when rows hold different lengths)."""

    @property
    def max_context(self) -> int:
        """Tokens the cache can hold; feeding more is a ``ContextLengthError``."""

    @property
    def nbytes(self) -> int:
        """All KV state as allocated (``memory.plan_state_bytes`` at the compute dtype predicts it)."""

    def reset(self) -> None:
        """Forget every token; the buffers stay allocated."""


class LayeredKVCache(KVCache, Protocol):
    """A cache the torch engine computes with: one layer cache per decoder layer, positions
    and counters on the device."""

    def __getitem__(self, i: int) -> Any:
        """Layer ``i``'s cache (``prefill``, ``store``, ``extend``)."""

    def positions(self, n_new: int) -> Any:
        """Positions ``[B, n_new]`` of each row's next tokens, on the cache's device."""

    def advance(self, n_new: int) -> None:
        """Count ``n_new`` tokens fed through every layer."""


class Engine(Protocol):
    """A served artifact: allocate caches, prefill, extend, generate."""

    @property
    def plan(self) -> Plan:
        """The artifact's plan (what ``allocate`` uses by default)."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def max_context(self) -> int:
        """The longest request (prompt and generated tokens) this engine serves."""

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    @property
    def manifest(self) -> Manifest | None:
        """The artifact's manifest, or None for an engine not loaded from an artifact."""

    @property
    def buffer_context(self) -> int | None:
        """Slots of every full-head buffer whatever a request asks for (ONNX graphs are built
        for one context), or None when buffers are allocated for each request's context."""

    def allocate(self, batch: int = 1, max_context: int | None = None,
                 plan: Plan | None = None) -> KVCache:
        """An empty cache for ``batch`` rows of up to ``max_context`` tokens under ``plan``."""

    def prefill(self, input_ids: Any, caches: Sequence[KVCache]) -> Any:
        """The prompt ``[B, T]`` into empty caches; the last position's logits ``[B, V]``."""

    def extend(self, input_ids: Any, cache: KVCache, all_logits: bool = False) -> Any:
        """``T`` more tokens through ``cache``; logits ``[B, T, V]`` or the last ``[B, V]``."""

    def encode(self, prompt: str, chat: bool = False) -> list[int]: ...

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 chat: bool = False,
                 on_text: Callable[[str], None] | None = None) -> Generation: ...
