"""The static-budget runtime: budgeted cache, custom ops, generation loop, artifact reader.

``kvcompile.runtime.load(DIR)`` returns an :class:`Engine` for a built artifact. Loading
imports nothing from the profiler, the fit, calibration or evaluation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def load(directory: str | Path, verify: bool = True, max_context: int | None = None,
         device: str | None = None, dtype: str | None = None, backend: str = "torch") -> Any:
    """Load a verified artifact and return its Engine (``engine.generate(prompt, ...)``).

    ``device``: ``cpu`` (default) or ``cuda``; ``dtype``: ``float32``, ``bfloat16`` or
    ``float16`` (default: the precision the artifact stores). ``backend="onnx"`` serves the
    artifact's ONNX graphs with onnxruntime instead (float32; ``device`` None picks CUDA when
    onnxruntime can use a GPU, else CPU).
    """
    if backend == "onnx":
        from kvcompile.runtime.onnx_backend import OnnxBackendError, load_onnx_engine

        if dtype not in (None, "float32"):
            raise OnnxBackendError(f"the ONNX graphs are float32; --dtype {dtype} needs "
                                   f"--backend torch")
        return load_onnx_engine(Path(directory), verify=verify, max_context=max_context,
                                device=device)
    if backend != "torch":
        from kvcompile.errors import KVCompileError

        raise KVCompileError(f"unknown backend {backend!r}; use torch or onnx")
    from kvcompile.runtime.artifact import load_engine

    return load_engine(Path(directory), verify=verify, max_context=max_context, device=device,
                       dtype=dtype)


__all__ = ["load"]
