"""The ONNX graphs' slot pool (:class:`~kvcompile.runtime.slots.SlotPool`): ``slots`` rows of one
batched cache, allocated once, served by the artifact's prefill and decode graphs.

Every cache tensor is one numpy array ``[slots, ...]`` wrapped by
``OrtValue.ortvalue_from_numpy``, which on CPU shares the array's memory: a row is the view
``arr[r:r+1]`` and the active rows the prefix ``arr[:n]``, both contiguous, so onnxruntime
reads and writes them where they lie. The prefill graph (B=1, the whole prompt) writes its
outputs straight into the new row's views; the decode graph steps the active prefix with
each cache tensor bound as both its ``past.*`` input and its ``present.*`` output, one
binding per active count made once, so a step writes the new slots in place and copies no
buffer. Per-row ``past_length`` lets rows of different lengths decode together
(``docs/ONNX.md``). Torch-free, like the backend it drives.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from kvcompile.errors import ContextLengthError
from kvcompile.runtime import onnx_io
from kvcompile.runtime.onnx_backend import OnnxBackendError, OnnxEngine
from kvcompile.runtime.slots import PoolError

__all__ = ["OnnxPrefillJob", "OnnxSlotPool", "onnx_bytes_per_slot"]


def onnx_bytes_per_slot(engine: OnnxEngine) -> int:
    """KV bytes of one row (all its state, as ``OnnxCache.nbytes`` counts it), computed from
    the graphs' cache shapes without allocating: what ``--kv-memory`` divides by."""
    return onnx_io.state_bytes(engine.plan, engine.cache_specs)


@dataclass
class OnnxPrefillJob:
    """A prompt waiting for a row: the ONNX prefill graph takes it whole in :meth:`finish`."""

    prompt_ids: np.ndarray  # [1, T] int64

    @property
    def prompt_tokens(self) -> int:
        return int(self.prompt_ids.shape[1])

    def step(self) -> bool:
        """No chunk runs before the last: the graph has no chunked prefill."""
        return False


class OnnxSlotPool:
    """``slots`` rows of the artifact's static-budget cache on CPU; rows ``0 .. active - 1``
    hold requests."""

    def __init__(self, engine: OnnxEngine, slots: int) -> None:
        if engine.device == "cuda":
            raise OnnxBackendError("the ONNX slot pool serves on CPU only (its rows are numpy "
                                   "views); use --backend torch to serve on CUDA")
        if slots < 1:
            raise PoolError(f"a slot pool needs at least one slot, not {slots}")
        self.engine = engine
        self._slots = slots
        self._active = 0
        self.arrays = {spec: np.zeros([slots, *spec.shape[1:]], dtype=spec.dtype)
                       for spec in engine.cache_specs}
        self.past_length = np.zeros(slots, dtype=np.int64)
        self._ids = np.zeros((slots, 1), dtype=np.int64)
        self._logits = np.zeros((slots, engine.vocab_size), dtype=np.float32)
        self._decode: dict[int, ort.IOBinding] = {}
        self._prefill: dict[int, ort.IOBinding] = {}
        self._bytes_per_slot = onnx_bytes_per_slot(engine)

    # -- sizes ----------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return self._slots

    @property
    def active(self) -> int:
        return self._active

    @property
    def max_context(self) -> int:
        """The engine's context (the graphs' unless a shorter one was asked for); every
        full-head buffer holds the graphs' context whatever this is."""
        return self.engine.max_context

    @property
    def bytes_per_slot(self) -> int:
        return self._bytes_per_slot

    @property
    def kv_bytes(self) -> int:
        return self._slots * self._bytes_per_slot

    # -- bindings -------------------------------------------------------------------------
    def _prefill_binding(self, row: int) -> ort.IOBinding:
        """Row ``row``'s views as the prefill graph's outputs (made once per row)."""
        if row not in self._prefill:
            binding = self.engine.prefill_session.io_binding()
            for spec, array in self.arrays.items():
                binding.bind_ortvalue_output(spec.output_name, _view(array[row:row + 1]))
            binding.bind_ortvalue_output(onnx_io.LOGITS, _view(self._logits[row:row + 1]))
            self._prefill[row] = binding
        return self._prefill[row]

    def _decode_binding(self, n: int) -> ort.IOBinding:
        """The first ``n`` rows, each cache tensor bound as input and output (made once per n)."""
        if n not in self._decode:
            binding = self.engine.decode_session.io_binding()
            binding.bind_ortvalue_input(onnx_io.INPUT_IDS, _view(self._ids[:n]))
            binding.bind_ortvalue_input(onnx_io.PAST_LENGTH, _view(self.past_length[:n]))
            for spec, array in self.arrays.items():
                value = _view(array[:n])
                binding.bind_ortvalue_input(spec.input_name, value)
                binding.bind_ortvalue_output(spec.output_name, value)
            binding.bind_ortvalue_output(onnx_io.LOGITS, _view(self._logits[:n]))
            self._decode[n] = binding
        return self._decode[n]

    # -- the SlotPool protocol ------------------------------------------------------------
    def begin(self, prompt_ids: Sequence[int]) -> OnnxPrefillJob:
        ids = np.asarray(list(prompt_ids), dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ContextLengthError("the prompt is empty")
        if ids.size > self.max_context:
            raise ContextLengthError(f"the prompt has {ids.size} tokens, more than the context "
                                     f"of {self.max_context}; shorten it")
        return OnnxPrefillJob(np.ascontiguousarray(ids[None, :]))

    def finish(self, job: OnnxPrefillJob) -> np.ndarray:
        if self._active == self._slots:
            raise PoolError(f"all {self._slots} slots are in use; release one first")
        row = self._active
        binding = self._prefill_binding(row)
        binding.bind_cpu_input(onnx_io.INPUT_IDS, job.prompt_ids)
        self.engine.prefill_session.run_with_iobinding(binding)
        self.past_length[row] = job.prompt_tokens
        self._active += 1
        return self._logits[row].copy()

    def decode(self, token_ids: Sequence[int]) -> np.ndarray:
        n = self._active
        if len(token_ids) != n or n == 0:
            raise PoolError(f"decode takes one token per active row: {n} rows, "
                             f"{len(token_ids)} tokens")
        full = np.flatnonzero(self.past_length[:n] >= self.max_context)
        if full.size:
            raise ContextLengthError(f"row {int(full[0])} holds {self.max_context} tokens, the "
                                     f"context; release it before decoding")
        self._ids[:n, 0] = token_ids
        self.engine.decode_session.run_with_iobinding(self._decode_binding(n))
        self.past_length[:n] += 1
        return self._logits[:n].copy()

    def release(self, row: int) -> int | None:
        if not 0 <= row < self._active:
            raise PoolError(f"row {row} is not active (rows 0 .. {self._active - 1} are)")
        last = self._active - 1
        self._active = last
        if row == last:
            return None  # the next prefill overwrites every tensor of the row
        for array in self.arrays.values():
            array[row] = array[last]
        self.past_length[row] = self.past_length[last]
        return last


def _view(array: np.ndarray) -> ort.OrtValue:
    """An OrtValue over ``array``'s own memory (CPU; the array must be contiguous)."""
    assert array.flags.c_contiguous
    return ort.OrtValue.ortvalue_from_numpy(array)
