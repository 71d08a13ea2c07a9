"""Serve an artifact's ONNX graphs with onnxruntime: ``kvcompile.runtime.load(DIR, backend="onnx")``.

The engine has the torch :class:`~kvcompile.runtime.engine.Engine`'s surface (``allocate``,
``prefill``, ``extend``, ``generate``, ``encode``) and computes with onnxruntime alone: the
``kvcompile`` nodes run their attached function bodies (nothing is registered). It imports
numpy, onnxruntime and the runtime's small modules; the tokenizer is the artifact's, loaded
with transformers exactly as the torch engine loads it.

The cache is allocated once per :class:`OnnxCache` as OrtValues on the session's device. A
decode step binds every cache tensor as both the graph's ``past.*`` input and its
``present.*`` output (IOBinding, one binding reused for every step): the nodes that write
them skip their input-to-output copy when the two are one buffer (``TensorScatter`` for full
heads; the single ``ScatterElements`` per buffer in ``BudgetedCacheUpdate``'s body), so a
step writes one slot per full head, at most three slots per budgeted head, their bias, and
the counters, and copies no cache buffer. A quantized group's decode writes its residual slot
and, when the ring fills, one token group of codes (``QuantizedAppend``'s scatters); its
selected codes pass through unchanged. Prefill writes its outputs straight into the same
buffers. ``docs/ONNX.md`` documents the graphs' inputs and outputs.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from kvcompile.errors import ArtifactError, ContextLengthError, KVCompileError
from kvcompile.plan import Plan
from kvcompile.runtime import onnx_io
from kvcompile.runtime.artifact import MANIFEST, open_artifact
from kvcompile.runtime.generation import (
    Generation,
    check_extend,
    check_prefill,
    check_prompt,
    decode_loop,
    encode_prompt,
    eos_ids,
)
from kvcompile.runtime.manifest import Manifest
from kvcompile.runtime.sampling import sample

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_NUMPY_DTYPES = {"float32": np.float32, "int64": np.int64, "float16": np.float16,
                 "uint8": np.uint8}


class OnnxBackendError(KVCompileError):
    """The ONNX graphs cannot serve this request (device, plan, missing graphs)."""


def _session_options(threads: int | None, log_severity: int) -> ort.SessionOptions:
    """Sleep-waiting workers unless OMP_WAIT_POLICY=ACTIVE, as the torch runtime does: spinning
    threads stall every small op on a shared or small CPU."""
    options = ort.SessionOptions()
    options.log_severity_level = log_severity
    if threads:
        options.intra_op_num_threads = threads
    if os.environ.get("OMP_WAIT_POLICY", "PASSIVE").upper() != "ACTIVE":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


@contextlib.contextmanager
def _quiet_ort():
    """onnxruntime logs to stderr when a provider cannot start; probing must stay quiet."""
    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(3)


# onnxruntime's load errors: its own classes derive from Exception, not RuntimeError
_ORT_LOAD_ERRORS = (RuntimeError, *(getattr(_ort_state, name) for name in (
    "Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NotImplemented",
    "RuntimeException") if hasattr(_ort_state, name)))


def _open(path: Path, options: ort.SessionOptions, device: str | None) -> ort.InferenceSession:
    """A session on ``device``: ``cpu``, ``cuda`` (must work) or None (CUDA if it works)."""
    if device not in (None, "cpu", "cuda"):
        raise OnnxBackendError(f"unsupported device {device!r} for the onnx backend; use cpu or "
                               f"cuda")
    wants_cuda = device == "cuda" or (device is None and CUDA in ort.get_available_providers())
    try:
        if wants_cuda:
            with _quiet_ort():
                session = ort.InferenceSession(str(path), options, providers=[CUDA, CPU])
            if CUDA in session.get_providers():
                return session
            if device == "cuda":
                raise OnnxBackendError("--device cuda: onnxruntime cannot start its CUDA provider "
                                       "here (no GPU or no CUDA libraries); use --device cpu")
        return ort.InferenceSession(str(path), options, providers=[CPU])
    except _ORT_LOAD_ERRORS as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"onnxruntime cannot load {path}: {first}; rebuild the artifact") from exc


class OnnxCache:
    """One request's static-budget cache as OrtValues, allocated once and updated in place.

    ``values`` maps each :class:`~kvcompile.runtime.onnx_io.CacheTensor` to its buffer;
    ``length`` counts the tokens fed (every row in step), mirrored on the device in
    ``past_length``, the decode graph's position input.
    """

    def __init__(self, engine: OnnxEngine, batch: int, max_context: int) -> None:
        self.engine = engine
        self.plan = engine.plan
        self.batch = batch
        self.max_context = max_context
        self.length = 0
        device, index = engine.device, 0
        self.values = {
            spec: ort.OrtValue.ortvalue_from_shape_and_type(
                [batch if d is None else d for d in spec.shape], _NUMPY_DTYPES[spec.dtype],
                device, index)
            for spec in engine.cache_specs
        }
        self.ids = ort.OrtValue.ortvalue_from_shape_and_type([batch, 1], np.int64, device, index)
        self.past_length = ort.OrtValue.ortvalue_from_shape_and_type([batch], np.int64, device,
                                                                     index)
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type([batch, engine.vocab_size],
                                                                np.float32, device, index)
        self._decode_binding: ort.IOBinding | None = None

    def decode_binding(self) -> ort.IOBinding:
        """The decode step's binding, made once: each cache buffer is input and output."""
        if self._decode_binding is None:
            binding = self.engine.decode_session.io_binding()
            binding.bind_ortvalue_input(onnx_io.INPUT_IDS, self.ids)
            binding.bind_ortvalue_input(onnx_io.PAST_LENGTH, self.past_length)
            for spec, value in self.values.items():
                binding.bind_ortvalue_input(spec.input_name, value)
                binding.bind_ortvalue_output(spec.output_name, value)
            binding.bind_ortvalue_output(onnx_io.LOGITS, self.logits)
            self._decode_binding = binding
        return self._decode_binding

    def set_length(self, length: int) -> None:
        self.length = length
        self.past_length.update_inplace(np.full(self.batch, length, dtype=np.int64))

    def reset(self) -> None:
        """Forget every token; the next prefill overwrites every buffer entirely."""
        self.length = 0

    @property
    def dtype(self) -> str:
        """The dtype of the keys and values the graphs hold (they compute in float32)."""
        return "float32"

    @property
    def nbytes(self) -> int:
        """KV memory, counted on the OrtValues allocated: every state tensor (codes, scales,
        full-precision parts, bias, counters) and one int64 length per layer with full heads
        (``past_length`` stands in for them), ``kvcompile.memory.plan_state_bytes`` per row."""
        lengths = sum(bool(layer.full_heads) for layer in self.plan.layers)
        return (sum(_nbytes(value) for value in self.values.values())
                + self.batch * lengths * onnx_io.ITEMSIZE["int64"])

    @property
    def overhead_bytes(self) -> int:
        """The step's token ids and logits, not KV memory (``past_length`` is counted there)."""
        return _nbytes(self.ids) + _nbytes(self.logits)


_ORT_ITEMSIZE = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(uint8)": 1,
                 "tensor(int64)": 8}


def _nbytes(value: ort.OrtValue) -> int:
    return int(np.prod(value.shape())) * _ORT_ITEMSIZE[value.data_type()]


class OnnxEngine:
    """The artifact's prefill and decode graphs in two onnxruntime sessions."""

    def __init__(self, directory: Path, plan: Plan, tokenizer: Any, graph_context: int,
                 max_context: int | None = None, device: str | None = None,
                 threads: int | None = None, log_severity: int = 3) -> None:
        """``log_severity``: onnxruntime's (2 shows warnings, e.g. a scatter that copies)."""
        self.directory = Path(directory)
        self.plan = plan
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_ids(tokenizer)
        self.manifest: Manifest | None = None  # set when loaded from an artifact
        graphs = self.directory / onnx_io.ONNX_DIR
        options = _session_options(threads, log_severity)
        self.prefill_session = _open(graphs / onnx_io.PREFILL_FILE, options, device)
        self.decode_session = _open(graphs / onnx_io.DECODE_FILE, options, device)
        self.device = "cuda" if CUDA in self.decode_session.get_providers() else "cpu"
        self.graph_context = graph_context  # every full-head buffer's slots
        self.cache_specs = self._cache_specs(graph_context)
        logits = next(o for o in self.decode_session.get_outputs() if o.name == onnx_io.LOGITS)
        self.vocab_size = int(logits.shape[-1])
        self.max_context = min(max_context or graph_context, graph_context)

    @property
    def buffer_context(self) -> int:
        """Every full-head buffer has the graphs' slots, whatever context a request asks for."""
        return self.graph_context

    def _cache_specs(self, graph_context: int) -> list[onnx_io.CacheTensor]:
        """The cache tensors the decode graph declares, checked against the manifest's plan
        and the context the graphs were built for (full-head buffers, RoPE tables)."""
        inputs = self.decode_session.get_inputs()[2:]
        head_dim = next((int(i.shape[3]) for i in inputs  # keys, values, residual rings
                         if len(i.shape) == 4 and i.type == "tensor(float)"), 1)
        expected = onnx_io.cache_tensors(self.plan, graph_context, head_dim)
        found = [(i.name, [None if isinstance(d, str) else int(d) for d in i.shape])
                 for i in inputs]
        if found != [(s.input_name, list(s.shape)) for s in expected]:
            raise ArtifactError(f"{self.directory}: the ONNX decode graph's cache does not match "
                                f"the plan in {MANIFEST}; rebuild the artifact")
        return expected

    # -- caches ---------------------------------------------------------------------------
    def allocate(self, batch: int = 1, max_context: int | None = None,
                 plan: Plan | None = None) -> OnnxCache:
        if plan is not None and plan != self.plan:
            raise OnnxBackendError("the ONNX graphs serve only the artifact's own plan; use the "
                                   "torch backend for other plans")
        context = max_context or self.max_context
        if context > self.max_context:
            raise ContextLengthError(f"a context of {context} tokens exceeds the {self.max_context} "
                                     f"the artifact's ONNX graphs were built for")
        return OnnxCache(self, batch, context)

    # -- forward --------------------------------------------------------------------------
    def prefill(self, input_ids: Any, caches: Sequence[OnnxCache]) -> np.ndarray:
        """The prompt ``[B, T]`` into empty caches (each its own run); last logits ``[B, V]``."""
        ids = np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64))
        length = ids.shape[1]
        check_prefill(length, caches)
        for cache in caches:
            binding = self.prefill_session.io_binding()
            binding.bind_cpu_input(onnx_io.INPUT_IDS, ids)
            for spec, value in cache.values.items():
                binding.bind_ortvalue_output(spec.output_name, value)
            binding.bind_ortvalue_output(onnx_io.LOGITS, cache.logits)
            self.prefill_session.run_with_iobinding(binding)
            cache.set_length(length)
        return caches[0].logits.numpy().copy()

    def extend(self, input_ids: Any, cache: OnnxCache, all_logits: bool = False) -> np.ndarray:
        """Feed ``T`` tokens one decode step at a time; logits ``[B, T, V]`` or the last ``[B, V]``."""
        ids = np.asarray(input_ids, dtype=np.int64)
        n_new = ids.shape[1]
        check_extend(cache, n_new)
        steps = [self.decode_step(ids[:, t:t + 1], cache) for t in range(n_new)]
        return np.stack(steps, axis=1) if all_logits else steps[-1]

    def decode_step(self, token_ids: Any, cache: OnnxCache) -> np.ndarray:
        """One token per row (``[B, 1]``) -> logits ``[B, V]``; the cache is updated in place."""
        cache.ids.update_inplace(np.ascontiguousarray(np.asarray(token_ids, dtype=np.int64)))
        self.decode_session.run_with_iobinding(cache.decode_binding())
        cache.set_length(cache.length + 1)
        return cache.logits.numpy().copy()

    # -- generation -----------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, chat)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 chat: bool = False, on_text: Callable[[str], None] | None = None) -> Generation:
        """Greedy when temperature is 0, else temperature + nucleus sampling (numpy, seeded)."""
        ids = self.encode(prompt, chat) if isinstance(prompt, str) else list(prompt)
        check_prompt(ids, max_new_tokens, self.max_context)
        rng = np.random.default_rng(seed if seed is not None else 0)
        cache = self.allocate(1)
        generated, text, reason = decode_loop(
            self.prefill(np.array([ids]), [cache]),
            lambda logits: sample(logits[0], temperature, top_p, rng),
            lambda token: self.decode_step(np.array([[token]]), cache),
            self.tokenizer, self.eos_token_ids, max_new_tokens, on_text)
        return Generation(len(ids), generated, text, reason, cache.nbytes)


def load_onnx_engine(directory: Path, verify: bool = True, max_context: int | None = None,
                     device: str | None = None, threads: int | None = None) -> OnnxEngine:
    """Verified artifact -> :class:`OnnxEngine` (see ``kvcompile.runtime.load``)."""
    directory = Path(directory)
    manifest = open_artifact(directory, verify)
    if manifest.onnx is None:
        raise ArtifactError(f"{directory} has no ONNX graphs (built with --no-onnx); rebuild it "
                            f"without --no-onnx or use --backend torch")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    engine = OnnxEngine(directory, manifest.plan, tokenizer, manifest.onnx.max_context,
                        max_context=max_context, device=device, threads=threads)
    engine.manifest = manifest
    return engine
