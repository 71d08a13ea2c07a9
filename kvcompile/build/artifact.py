"""Build the artifact directory (``kvcompile-artifact/1``) atomically.

Build writes everything into a temporary sibling directory and renames it into place, so
an interrupted build never leaves half an artifact. The reader (format, checksums, plan,
``load_engine``) lives with the runtime, ``kvcompile.runtime.artifact``, and is re-exported
here for the build's callers.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kvcompile import __version__
from kvcompile.errors import ArtifactError
from kvcompile.memory import memory_table, plan_bytes
from kvcompile.metrics import greedy_agreement
from kvcompile.models import LoadedModel, fingerprint_weights
from kvcompile.passes import CompiledModel, compile_model
from kvcompile.plan import Plan
from kvcompile.plan_io import plan_to_dict
from kvcompile.profile.record import Profile, check_profile_matches
from kvcompile.runtime.artifact import (
    ARTIFACT_FORMAT,
    MANIFEST,
    WEIGHTS,
    artifact_plan,
    load_engine,
    read_manifest,
    sha256_file,
    verify_files,
)
from kvcompile.runtime.cache import StaticKVCache
from kvcompile.runtime.placement import dtype_name, resolve_dtype
from kvcompile.yamlio import atomic_write_text, current_umask, dump_yaml

__all__ = ["ARTIFACT_FORMAT", "MANIFEST", "WEIGHTS", "artifact_plan", "build_artifact",
           "compile_engine", "load_engine", "parity_checks", "read_manifest", "sha256_file",
           "verify_files"]
PARITY_DECODE_STEPS = 4
LOW_PRECISION_MIN_AGREEMENT = 0.8  # greedy tokens of the parity prompt that must survive the cast
PARITY_PROMPT = "The quick brown fox jumps over the lazy dog. Static KV budgets keep memory flat."


def _config_dict(config: Any, dtype: str) -> dict[str, Any]:
    data = config.to_dict()
    data.pop("quantization_config", None)  # weights are stored dequantized
    data.pop("_name_or_path", None)
    data["torch_dtype"] = dtype
    return data


def parity_checks(loaded: LoadedModel, compiled: CompiledModel, engine: Any) -> dict[str, Any]:
    """Permuted model vs source (same function) and short-prompt runtime vs uncompressed."""
    from kvcompile.runtime.model import exact_attention

    source = loaded.build()
    exact = exact_attention(loaded.arch)
    ids = parity_ids(loaded.tokenizer, loaded.arch.vocab_size)

    def logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.logits(model.hidden_states(tokens, torch.arange(tokens.shape[1]), exact))

    permute_diff = float((logits(source, ids) - logits(engine.model, ids)).abs().max())
    # prefill + DECODE_STEPS steps, all within every budgeted head's token slots: must be exact
    smallest = min((layer.layout.token_slots for layer in compiled.plan.layers if layer.layout),
                   default=ids.shape[1])
    total = min(ids.shape[1], smallest)
    prompt = max(1, total - PARITY_DECODE_STEPS)
    cache = engine.allocate(1, max_context=total)
    steps = [engine.prefill(ids[:, :prompt], [cache])]
    steps += [engine.extend(ids[:, t:t + 1], cache) for t in range(prompt, total)]
    reference = logits(source, ids[:, :total])[0, prompt - 1:]
    budget_diff = float((torch.cat(steps) - reference).abs().max())
    return {
        "permuted_vs_source_max_abs_logit_diff": permute_diff,
        "runtime_vs_uncompressed_within_capacity_max_abs_logit_diff": budget_diff,
        "prompt_tokens": total,
        "passed": permute_diff < 1e-4 and budget_diff < 1e-3,
    }


def compile_engine(loaded: LoadedModel, plan: Plan, max_context: int | None = None):
    """Run the passes and return (compiled model, Engine) without writing anything."""
    from kvcompile.runtime.engine import Engine
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


def low_precision_check(engine: Any, tokenizer: Any, dtype: torch.dtype) -> dict[str, Any]:
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
    return {"dtype": dtype_name(dtype),
            "max_abs_logit_diff_vs_float32": float((logits - reference).abs().max()),
            "greedy_agreement_vs_float32": agreement,
            "passed": agreement >= LOW_PRECISION_MIN_AGREEMENT}


def build_artifact(loaded: LoadedModel, profile: Profile, out_dir: Path, force: bool = False,
                   max_context: int | None = None, dtype: str = "float32",
                   onnx: bool = True) -> dict[str, Any]:
    """Compile ``loaded`` with ``profile`` into ``out_dir``; returns the build report.

    Parity is checked in float32; ``dtype`` is the precision the weights are stored (and by
    default served) in, checked against float32 on the parity prompt. ``onnx`` also writes the
    static-budget ONNX graphs (``onnx/``, float32, ``kvcompile.build.onnx_graphs``), checked in
    onnxruntime against the torch runtime.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ArtifactError(f"{out_dir} already exists; pass --force to replace it")
    stored = resolve_dtype(dtype)
    check_profile_matches(profile, loaded)
    compiled, engine = compile_engine(loaded, profile.plan, max_context)
    parity = parity_checks(loaded, compiled, engine)
    if stored != torch.float32:
        parity["low_precision"] = low_precision_check(engine, loaded.tokenizer, stored)
        parity["passed"] = parity["passed"] and parity["low_precision"]["passed"]
    if not parity["passed"]:
        raise ArtifactError(f"parity checks failed, nothing written: {parity}")
    arch = loaded.arch
    context = engine.max_context
    itemsize = stored.itemsize
    allocated = StaticKVCache.allocate(compiled.plan, 1, context, arch.head_dim, arch.group_size,
                                       dtype=stored).nbytes
    predicted = plan_bytes(compiled.plan, arch, context, itemsize)
    report = {
        "format": "kvcompile-build-report/1",
        "parity": parity,
        "passes": compiled.log,
        "memory": {
            "max_context": context,
            "dtype": dtype_name(stored),
            "allocated_kv_bytes": allocated,
            "predicted_kv_bytes": predicted,
            "equal": allocated == predicted,
            "table": memory_table(compiled.plan, arch, itemsize, extra=(context,)),
        },
    }
    compiled.state = {name: tensor.to(stored) if tensor.is_floating_point() else tensor
                      for name, tensor in compiled.state.items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        _write_files(tmp, loaded, profile, compiled, report, context,
                     onnx_engine=engine if onnx else None)
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            out_dir.rename(trash / "old")
            tmp.rename(out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _write_onnx(tmp: Path, loaded: LoadedModel, compiled: CompiledModel, engine: Any,
                max_context: int) -> dict[str, Any]:
    """The ONNX graphs into ``tmp/onnx`` and their parity with the torch runtime (fail-closed)."""
    from kvcompile.build.onnx_graphs import onnx_parity, write_onnx
    from kvcompile.runtime import onnx_io

    section = write_onnx(tmp / onnx_io.ONNX_DIR, loaded.build(), compiled.plan, max_context)
    ids = parity_ids(loaded.tokenizer, loaded.arch.vocab_size)
    section["parity"] = onnx_parity(tmp, engine, ids, PARITY_DECODE_STEPS, max_context)
    if not section["parity"]["passed"]:
        raise ArtifactError(f"ONNX parity failed, nothing written: {section['parity']}; "
                            f"build with --no-onnx to skip the ONNX graphs")
    return section


def _write_files(tmp: Path, loaded: LoadedModel, profile: Profile, compiled: CompiledModel,
                 report: dict[str, Any], max_context: int, onnx_engine: Any = None) -> None:
    from kvcompile.profile.record import profile_to_dict
    from kvcompile.runtime import onnx_io

    onnx_section = None
    if onnx_engine is not None:  # first: a failed export leaves nothing but the temporary dir
        report["onnx"] = _write_onnx(tmp, loaded, compiled, onnx_engine, max_context)
        onnx_section = {"prefill": f"{onnx_io.ONNX_DIR}/{onnx_io.PREFILL_FILE}",
                        "decode": f"{onnx_io.ONNX_DIR}/{onnx_io.DECODE_FILE}",
                        "weights": f"{onnx_io.ONNX_DIR}/{onnx_io.WEIGHTS_FILE}",
                        **{key: report["onnx"][key] for key in ("opset", "domain", "dtype",
                                                               "max_context")}}

    dtype = dtype_name(next(iter(compiled.state.values())).dtype)
    save_file({k: v.contiguous() for k, v in compiled.state.items()}, str(tmp / WEIGHTS),
              metadata={"format": "pt", "kvcompile": ARTIFACT_FORMAT})
    os.chmod(tmp / WEIGHTS, 0o666 & ~current_umask())  # safetensors writes 0600; artifacts are shared
    (tmp / "config.json").write_text(json.dumps(_config_dict(loaded.config, dtype), indent=2,
                                                sort_keys=True))
    loaded.tokenizer.save_pretrained(str(tmp))
    generation = {"eos_token_id": loaded.tokenizer.eos_token_id, "bos_token_id": loaded.tokenizer.bos_token_id}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (tmp / "profile.yaml").write_text(dump_yaml(profile_to_dict(profile)))
    (tmp / "build-report.json").write_text(json.dumps(report, indent=2))
    files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {
        "format": ARTIFACT_FORMAT,
        "kvcompile_version": __version__,
        "source_model": {"source": loaded.source, "name": loaded.name, "fingerprint": loaded.fingerprint},
        "weights_fingerprint": fingerprint_weights(loaded.config, compiled.state),
        "dtype": dtype,
        "max_context": max_context,
        "attention": compiled.attention,
        "passes": compiled.log,
        "plan": plan_to_dict(compiled.plan),
        "onnx": onnx_section,
        "files": files,
    }
    atomic_write_text(tmp / MANIFEST, dump_yaml(manifest))


