"""Build the artifact directory (``kvcompile-artifact/1``) atomically.

Build writes everything into a temporary sibling directory and renames it into place, so
an interrupted build never leaves half an artifact (``build.staging``: temporaries, stale
ones of builds that were killed, the final rename). A full disk is one line, and leaves
nothing. The reader (format, checksums, plan, ``load_engine``) lives with the runtime,
``kvcompile.runtime.artifact``, and is re-exported here for the build's callers; the
manifest's file form is ``kvcompile.runtime.manifest``'s, the build report's
``kvcompile.build.report``'s.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kvcompile.build.report import (
    BUILD_REPORT,
    BuildReport,
    LowPrecisionCheck,
    MemoryCheck,
    OnnxBuild,
    ParityChecks,
    build_report_json,
)
from kvcompile.build.staging import (
    is_disk_full,
    make_temporary,
    move_into_place,
    remove_stale_temporaries,
)
from kvcompile.errors import ArtifactError
from kvcompile.interrupts import signals_deferred
from kvcompile.memory import baseline_bytes_per_value, memory_table, plan_bytes
from kvcompile.metrics import greedy_agreement
from kvcompile.models import LoadedModel, fingerprint_weights
from kvcompile.passes import ATTENTION_NAME, PASSES, CompiledModel, compile_model
from kvcompile.plan import FULL_STORAGE, Plan
from kvcompile.profile.record import Profile, check_profile_matches
from kvcompile.runtime.artifact import (
    ARTIFACT_FORMAT,
    MANIFEST,
    PROFILE,
    WEIGHTS,
    load_engine,
    open_artifact,
    read_manifest,
    sha256_file,
    verify_files,
)
from kvcompile.runtime.cache import StaticKVCache
from kvcompile.runtime.engine import Engine
from kvcompile.runtime.manifest import Manifest, OnnxGraphs, SourceModel, manifest_to_dict
from kvcompile.runtime.placement import dtype_name, resolve_dtype
from kvcompile.yamlio import atomic_write_text, current_umask, dump_yaml

__all__ = ["ARTIFACT_FORMAT", "MANIFEST", "WEIGHTS", "build_artifact", "compile_engine",
           "load_engine", "open_artifact", "parity_checks", "read_manifest", "sha256_file",
           "verify_files"]
PARITY_DECODE_STEPS = 4
PARITY_PROMPT = "The quick brown fox jumps over the lazy dog. Static KV budgets keep memory flat."


def _config_dict(config: Any, dtype: str) -> dict[str, Any]:
    data = config.to_dict()
    data.pop("quantization_config", None)  # weights are stored dequantized
    data.pop("_name_or_path", None)
    data["torch_dtype"] = dtype
    return data


def parity_checks(loaded: LoadedModel, compiled: CompiledModel, engine: Engine) -> ParityChecks:
    """Permuted model vs source (same function) and short-prompt runtime vs uncompressed (the
    plan's heads and layouts at full precision: within capacity that is the model itself)."""
    from kvcompile.runtime.model import exact_attention

    source = loaded.build()
    exact = exact_attention(loaded.arch)
    ids = parity_ids(loaded.tokenizer, loaded.arch.vocab_size)

    def logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.logits(model.hidden_states(tokens, torch.arange(tokens.shape[1]), exact))

    permute_diff = float((logits(source, ids) - logits(engine.model, ids)).abs().max())
    # prefill + PARITY_DECODE_STEPS steps, all within every budgeted head's token slots: exact
    smallest = min((layer.layout.token_slots for layer in compiled.plan.layers if layer.layout),
                   default=ids.shape[1])
    total = min(ids.shape[1], smallest)
    prompt = max(1, total - PARITY_DECODE_STEPS)
    # a plan's quantized groups change the function by design (eval measures by how much):
    # the exact check serves the same heads, layouts and permutation at full precision
    exact_plan = replace(compiled.plan, layers=tuple(
        replace(layer, full_storage=FULL_STORAGE, budget_storage=FULL_STORAGE)
        for layer in compiled.plan.layers))
    cache = engine.allocate(1, max_context=total, plan=exact_plan)
    steps = [engine.prefill(ids[:, :prompt], [cache])]
    steps += [engine.extend(ids[:, t:t + 1], cache) for t in range(prompt, total)]
    reference = logits(source, ids[:, :total])[0, prompt - 1:]
    budget_diff = float((torch.cat(steps) - reference).abs().max())
    return ParityChecks(permuted_vs_source=permute_diff, runtime_vs_uncompressed=budget_diff,
                        prompt_tokens=total)


def compile_engine(loaded: LoadedModel, plan: Plan,
                   max_context: int | None = None) -> tuple[CompiledModel, Engine]:
    """Run the passes and return (compiled model, Engine) without writing anything."""
    from kvcompile.runtime.model import CompactLM

    compiled = compile_model(loaded.arch, loaded.config, loaded.state, plan)
    model = CompactLM.from_state_dict(loaded.arch, loaded.config, compiled.state)
    return compiled, Engine(model, compiled.plan, loaded.tokenizer, max_context=max_context)


def parity_ids(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """``[1, T]`` ids of the parity prompt; seeded ids when the tokenizer gives too few of them
    (a vocabulary without these words), since the checks need tokens, not text."""
    ids = list(tokenizer(PARITY_PROMPT)["input_ids"])
    if len(ids) < PARITY_DECODE_STEPS + 4:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (1, 16), generator=generator)
    return torch.tensor([ids])


def low_precision_check(engine: Engine, tokenizer: Any, dtype: torch.dtype) -> LowPrecisionCheck:
    """The stored precision against float32 on the parity prompt (the fit was made in float32).

    Half precision moves logits a little; a wrong cast or a layout bug moves the argmax.
    """
    from kvcompile.runtime.model import exact_attention

    model = engine.model
    ids = parity_ids(tokenizer, model.arch.vocab_size)
    with torch.no_grad():
        exact = exact_attention(model.arch)
        reference = model.logits(model.hidden_states(ids, torch.arange(ids.shape[1]), exact))
        low = copy.deepcopy(model).to(dtype)
        logits = low.logits(low.hidden_states(ids, torch.arange(ids.shape[1]), exact)).float()
    agreement = greedy_agreement(reference, logits)
    return LowPrecisionCheck(dtype=dtype_name(dtype),
                             max_abs_logit_diff=float((logits - reference).abs().max()),
                             greedy_agreement=agreement)


def build_artifact(loaded: LoadedModel, profile: Profile, out_dir: Path, force: bool = False,
                   max_context: int | None = None, dtype: str = "float32",
                   onnx: bool = True, baseline_dtype: str = "bfloat16") -> BuildReport:
    """Compile ``loaded`` with ``profile`` into ``out_dir``; returns the build report.

    Parity is checked in float32; ``dtype`` is the precision the weights are stored (and by
    default served) in, checked against float32 on the parity prompt. ``onnx`` also writes the
    static-budget ONNX graphs (``onnx/``, float32, ``kvcompile.build.onnx_graphs``), checked in
    onnxruntime against the torch runtime. The memory table's ratios count values at
    ``baseline_dtype`` (``kvcompile.memory``); the allocation check at ``dtype``. Temporaries of earlier builds into ``out_dir``
    whose process is gone are removed first.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ArtifactError(f"{out_dir} already exists; pass --force to replace it")
    stored = resolve_dtype(dtype)
    baseline_bytes = baseline_bytes_per_value(baseline_dtype)  # a bad name fails before any work
    check_profile_matches(profile, loaded)
    compiled, engine = compile_engine(loaded, profile.plan, max_context)
    parity = parity_checks(loaded, compiled, engine)
    if stored != torch.float32:
        parity = replace(parity, low_precision=low_precision_check(engine, loaded.tokenizer,
                                                                   stored))
    if not parity.passed:
        raise ArtifactError(f"parity checks failed, nothing written: {parity}")
    arch = loaded.arch
    context = engine.max_context
    itemsize = stored.itemsize
    allocated = StaticKVCache.allocate(compiled.plan, 1, context, arch.head_dim, arch.group_size,
                                       dtype=stored).nbytes
    memory = MemoryCheck(
        max_context=context, dtype=dtype_name(stored), allocated_kv_bytes=allocated,
        predicted_kv_bytes=plan_bytes(compiled.plan, arch, context, itemsize),
        table=tuple(memory_table(compiled.plan, arch, baseline_bytes, extra=(context,))),
        baseline_dtype=baseline_dtype)
    # what the weights take on disk (the ONNX graphs hold a float32 copy): for a full disk's line
    needed = sum(t.numel() * (stored.itemsize if t.is_floating_point() else t.element_size())
                 + (t.numel() * 4 if onnx else 0) for t in compiled.state.values())
    compiled.state = {name: tensor.to(stored) if tensor.is_floating_point() else tensor
                      for name, tensor in compiled.state.items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    tmp: Path | None = None
    try:
        tmp = make_temporary(out_dir)
        graphs = _write_onnx(tmp, loaded, compiled, engine, context) if onnx else None
        report = BuildReport(parity=parity, passes=PASSES, memory=memory,
                             onnx=graphs)
        _write_files(tmp, loaded, profile, compiled, report, context)
        move_into_place(tmp, out_dir)
    except BaseException as exc:  # an error, SIGINT, SIGTERM (kvcompile.interrupts)
        disk_full = is_disk_full(exc, out_dir.parent)  # asked while the disk is still full
        if tmp is not None:
            with signals_deferred():  # a second signal must not cut the cleanup short
                shutil.rmtree(tmp, ignore_errors=True)
        if disk_full:
            raise ArtifactError(
                f"no space left on the device of {out_dir.parent} while writing the artifact "
                f"(about {needed / 2**20:.0f} MiB); free space and build again; nothing was "
                f"written") from exc
        raise
    return report


def _write_onnx(tmp: Path, loaded: LoadedModel, compiled: CompiledModel, engine: Engine,
                max_context: int) -> OnnxBuild:
    """The ONNX graphs into ``tmp/onnx`` and their parity with the torch runtime (fail-closed)."""
    from kvcompile.build.onnx_graphs import onnx_parity, write_onnx
    from kvcompile.runtime import onnx_io

    export = write_onnx(tmp / onnx_io.ONNX_DIR, loaded.build(), compiled.plan, max_context)
    ids = parity_ids(loaded.tokenizer, loaded.arch.vocab_size)
    parity = onnx_parity(tmp, engine, ids, PARITY_DECODE_STEPS, max_context)
    if not parity.passed:
        raise ArtifactError(f"ONNX parity failed, nothing written: {parity}; "
                            f"build with --no-onnx to skip the ONNX graphs")
    return OnnxBuild(export, parity)


def _write_files(tmp: Path, loaded: LoadedModel, profile: Profile, compiled: CompiledModel,
                 report: BuildReport, max_context: int) -> None:
    """Everything but the ONNX graphs (already in ``tmp``), the manifest last."""
    from kvcompile.profile.record import profile_to_dict
    from kvcompile.runtime import onnx_io

    dtype = report.memory.dtype  # the stored precision, as the build report states it
    save_file({k: v.contiguous() for k, v in compiled.state.items()}, str(tmp / WEIGHTS),
              metadata={"format": "pt", "kvcompile": ARTIFACT_FORMAT})
    os.chmod(tmp / WEIGHTS, 0o666 & ~current_umask())  # safetensors writes 0600; artifacts are shared
    (tmp / "config.json").write_text(json.dumps(_config_dict(loaded.config, dtype), indent=2,
                                                sort_keys=True))
    loaded.tokenizer.save_pretrained(str(tmp))
    generation = {"eos_token_id": loaded.tokenizer.eos_token_id, "bos_token_id": loaded.tokenizer.bos_token_id}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (tmp / PROFILE).write_text(dump_yaml(profile_to_dict(profile)))
    (tmp / BUILD_REPORT).write_text(build_report_json(report))
    files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    graphs = None
    if report.onnx is not None:
        export = report.onnx.export
        graphs = OnnxGraphs(prefill=f"{onnx_io.ONNX_DIR}/{onnx_io.PREFILL_FILE}",
                            decode=f"{onnx_io.ONNX_DIR}/{onnx_io.DECODE_FILE}",
                            weights=f"{onnx_io.ONNX_DIR}/{onnx_io.WEIGHTS_FILE}",
                            opset=export.opset, domain=export.domain, dtype=export.dtype,
                            max_context=export.max_context)
    manifest = Manifest(
        source_model=SourceModel(source=loaded.source, name=loaded.name,
                                 fingerprint=loaded.fingerprint),
        weights_fingerprint=fingerprint_weights(loaded.config, compiled.state),
        dtype=dtype,
        max_context=max_context,
        attention=ATTENTION_NAME,
        passes=PASSES,
        plan=compiled.plan,
        onnx=graphs,
        files=files,
    )
    atomic_write_text(tmp / MANIFEST, dump_yaml(manifest_to_dict(manifest)))
