"""The engine ``kvcompile eval --backend onnx`` measures: the artifact in onnxruntime, the
uncompressed baseline in the torch runtime, one set of cases.

The ONNX graphs are specialised to the artifact's plan, so they cannot also serve the all-full
baseline the evaluation protocol compares against. :class:`OnnxBesideTorch` looks like one
:class:`~kvcompile.runtime.engine.Engine` to ``evaluate``: caches for the artifact's plan live
in onnxruntime, every other plan's in the torch runtime; logits come back as torch tensors.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from kvcompile.plan import Plan
from kvcompile.runtime.engine import Engine
from kvcompile.runtime.generation import Generation
from kvcompile.runtime.manifest import Manifest
from kvcompile.runtime.onnx_backend import (
    OnnxBackendError,
    OnnxCache,
    OnnxEngine,
    load_onnx_engine,
)
from kvcompile.runtime.protocols import KVCache

BACKENDS = ("torch", "onnx")


class OnnxBesideTorch:
    """Artifact plan -> onnxruntime, any other plan -> the torch engine (same weights)."""

    def __init__(self, torch_engine: Engine, onnx_engine: OnnxEngine) -> None:
        self.torch_engine = torch_engine
        self.onnx_engine = onnx_engine
        self.model = torch_engine.model
        self.arch = torch_engine.arch
        self.tokenizer = torch_engine.tokenizer
        self.plan = onnx_engine.plan
        self.manifest: Manifest | None = torch_engine.manifest
        self.eos_token_ids = torch_engine.eos_token_ids
        self.max_context = min(torch_engine.max_context, onnx_engine.max_context)

    @property
    def buffer_context(self) -> int | None:
        """The graphs' buffers have this many slots whatever the request: memory ratios compare
        the baseline allocated for the same context (evaluate.memory_context)."""
        return self.onnx_engine.buffer_context

    @property
    def device(self) -> torch.device:
        """Where the torch side runs (logits of both sides come back here)."""
        return self.torch_engine.device

    def uncompressed_plan(self) -> Plan:
        return self.torch_engine.uncompressed_plan()

    def allocate(self, batch: int = 1, max_context: int | None = None,
                 plan: Plan | None = None) -> KVCache:
        if plan is None or plan == self.onnx_engine.plan:
            return self.onnx_engine.allocate(batch, max_context)
        return self.torch_engine.allocate(batch, max_context, plan)

    def prefill(self, input_ids: torch.Tensor, caches: Sequence[KVCache]) -> torch.Tensor:
        """Torch caches share one exact prefill; ONNX caches run the prefill graph. Returns the
        first cache's last logits, as the torch engine does."""
        on_onnx = [cache for cache in caches if isinstance(cache, OnnxCache)]
        on_torch = [cache for cache in caches if not isinstance(cache, OnnxCache)]
        logits = {}
        if on_torch:
            logits["torch"] = self.torch_engine.prefill(input_ids, on_torch)
        if on_onnx:
            logits["onnx"] = torch.from_numpy(
                self.onnx_engine.prefill(input_ids.cpu().numpy(), on_onnx)).to(self.device)
        return logits["onnx" if isinstance(caches[0], OnnxCache) else "torch"]

    def extend(self, input_ids: torch.Tensor, cache: KVCache,
               all_logits: bool = False) -> torch.Tensor:
        if isinstance(cache, OnnxCache):
            logits = self.onnx_engine.extend(input_ids.cpu().numpy(), cache, all_logits)
            return torch.from_numpy(logits).to(self.device)
        return self.torch_engine.extend(input_ids, cache, all_logits)

    # -- generation: the artifact's own plan, so the ONNX graphs serve it -----------------
    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        return self.onnx_engine.encode(prompt, chat)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 chat: bool = False, on_text: Callable[[str], None] | None = None) -> Generation:
        return self.onnx_engine.generate(prompt, max_new_tokens, temperature, top_p, seed, chat,
                                         on_text)


def load_for_eval(directory: Path, backend: str, device: str | None = None,
                  dtype: str | None = None) -> Engine | OnnxBesideTorch:
    """The verified artifact's engine for ``kvcompile eval --backend --device --dtype``."""
    from kvcompile.runtime.artifact import load_engine

    if backend not in BACKENDS:
        raise OnnxBackendError(f"unknown backend {backend!r}; use torch or onnx")
    if backend == "onnx":
        if dtype not in (None, "float32"):
            raise OnnxBackendError(f"the ONNX graphs are float32; --dtype {dtype} needs "
                                   f"--backend torch")
        dtype = "float32"  # the baseline in the graphs' precision, whatever the weights store
    engine = load_engine(directory, device=device, dtype=dtype)
    if backend == "torch":
        return engine
    return OnnxBesideTorch(engine, load_onnx_engine(directory, verify=False,
                                                    device=engine.device.type))
