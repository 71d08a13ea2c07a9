"""Write an artifact's ``onnx/`` directory: export, static-budget passes, shared weights.

``kvcompile build`` calls :func:`write_onnx` (unless ``--no-onnx``) on its temporary
directory, so the graphs are covered by the manifest's checksums and renamed into place with
the rest. Both graphs read one external-data file (``weights.onnx.data``): they hold the same
permuted weights, stored once. Anything that cannot be exported or rewritten is refused here
with one line naming ``--no-onnx``, never written as a broken graph.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from kvcompile.build.report import ONNX_PARITY_TOLERANCE, OnnxExport, OnnxParity
from kvcompile.errors import ArtifactError
from kvcompile.plan import Plan
from kvcompile.runtime import onnx_io
from kvcompile.runtime.engine import Engine
from kvcompile.runtime.model import CompactLM

__all__ = ["ONNX_PARITY_TOLERANCE", "onnx_parity", "save_shared", "write_onnx"]
_SKIP_HINT = "build with --no-onnx to skip the ONNX graphs"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def write_onnx(directory: Path, model: CompactLM, plan: Plan, max_context: int) -> OnnxExport:
    """Export ``model`` (the float32 source, unpermuted), rewrite both graphs for ``plan`` and
    save them in ``directory``; returns what the build report says of them (times, sizes,
    which passes changed the graphs)."""
    from kvcompile.build.onnx_export import export_source
    from kvcompile.passes.onnx import PassFailed, run_static_budget_passes

    arch = model.arch
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        source = export_source(model, max_context)
    except Exception as exc:  # the exporter fails in many ways; none may leave a graph behind
        raise ArtifactError(f"the ONNX export of this {arch.family} model failed "
                            f"({_first_line(exc)}); {_SKIP_HINT}") from exc
    exported = time.perf_counter()
    log: dict[str, list[dict[str, Any]]] = {}
    for kind in ("prefill", "decode"):
        try:
            graph = getattr(source, kind)
            log[kind] = run_static_budget_passes(graph, kind, plan, arch, max_context)
        except PassFailed as exc:
            raise ArtifactError(f"the ONNX pass {exc.pass_name} failed on the {kind} graph "
                                f"({_first_line(exc.reason)}); {_SKIP_HINT}") from exc
    rewritten = time.perf_counter()
    save_shared(source.prefill, source.decode, directory)
    saved = time.perf_counter()
    files = {name: (directory / name).stat().st_size
             for name in (onnx_io.PREFILL_FILE, onnx_io.DECODE_FILE, onnx_io.WEIGHTS_FILE)}
    return OnnxExport(
        opset=onnx_io.OPSET, domain=f"{onnx_io.DOMAIN}:{onnx_io.DOMAIN_VERSION}",
        dtype="float32", max_context=max_context,
        export_s=round(exported - started, 2), passes_s=round(rewritten - exported, 2),
        save_s=round(saved - rewritten, 2), file_bytes=files, passes=log)


def save_shared(prefill: ir.Model, decode: ir.Model, directory: Path) -> None:
    """Save both graphs; every weight the two hold alike is stored once, in WEIGHTS_FILE."""
    ir.save(prefill, directory / onnx_io.PREFILL_FILE, external_data=onnx_io.WEIGHTS_FILE)
    stored = ir.load(directory / onnx_io.PREFILL_FILE)
    for name, value in decode.graph.initializers.items():
        twin = stored.graph.initializers.get(name)
        theirs = None if twin is None else twin.const_value
        mine = value.const_value
        if (isinstance(theirs, ir.ExternalTensor) and mine is not None
                and theirs.dtype == mine.dtype and theirs.shape == mine.shape
                and np.array_equal(theirs.numpy(), mine.numpy())):
            value.const_value = theirs
    ir.save(decode, directory / onnx_io.DECODE_FILE)


def onnx_parity(artifact_dir: Path, engine: Engine, ids: Any, steps: int,
                graph_context: int) -> OnnxParity:
    """The written graphs in onnxruntime (function bodies, nothing registered) against the
    torch runtime: prefill ``ids[:, :-steps]``, then ``steps`` decode steps; max |logit diff|."""
    import torch

    from kvcompile.runtime.onnx_backend import OnnxEngine

    onnx_engine = OnnxEngine(artifact_dir, engine.plan, None, graph_context, device="cpu")
    prompt = max(1, ids.shape[1] - steps)
    torch_cache = engine.allocate(1, max_context=ids.shape[1])
    onnx_cache = onnx_engine.allocate(1, max_context=ids.shape[1])
    diffs = [np.abs(onnx_engine.prefill(ids[:, :prompt].numpy(), [onnx_cache])
                    - engine.prefill(ids[:, :prompt], [torch_cache]).numpy()).max()]
    with torch.no_grad():
        for t in range(prompt, ids.shape[1]):
            reference = engine.extend(ids[:, t:t + 1], torch_cache).numpy()
            diffs.append(np.abs(onnx_engine.extend(ids[:, t:t + 1].numpy(), onnx_cache)
                                - reference).max())
    return OnnxParity(max_abs_logit_diff=float(max(diffs)), prompt_tokens=prompt,
                      decode_steps=ids.shape[1] - prompt)
