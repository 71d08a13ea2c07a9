"""The artifact directory (``kvcompile-artifact/1``): build it atomically, load it verified.

Build writes everything into a temporary sibling directory and renames it into place, so
an interrupted build never leaves half an artifact. Load checks the format version, every
file's sha256 and the weights' fingerprint before anything runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from kvcompile import __version__
from kvcompile.errors import ArtifactError, ProfileError
from kvcompile.memory import memory_table, plan_bytes
from kvcompile.models import LoadedModel, fingerprint_weights
from kvcompile.passes import DEFAULT_PASSES, CompiledModel, run_passes
from kvcompile.plan import Plan
from kvcompile.profile_io import Profile, _Reader, plan_from_dict, plan_to_dict
from kvcompile.yamlio import atomic_write_text, current_umask, dump_yaml

ARTIFACT_FORMAT = "kvcompile-artifact/1"
MANIFEST = "manifest.yaml"
WEIGHTS = "model.safetensors"
PARITY_DECODE_STEPS = 4
PARITY_PROMPT = "The quick brown fox jumps over the lazy dog. Static KV budgets keep memory flat."


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_profile_matches(profile: Profile, loaded: LoadedModel) -> None:
    if profile.fingerprint != loaded.fingerprint:
        raise ProfileError(
            f"the profile was made for model {profile.model.get('name', '?')} "
            f"({profile.fingerprint[:19]}…), not {loaded.name} ({loaded.fingerprint[:19]}…); "
            f"run `kvcompile profile {loaded.source}` first"
        )


def _config_dict(config: Any) -> dict[str, Any]:
    data = config.to_dict()
    data.pop("quantization_config", None)  # weights are stored dequantized
    data.pop("_name_or_path", None)
    data["torch_dtype"] = "float32"
    return data


def parity_checks(loaded: LoadedModel, compiled: CompiledModel, engine: Any) -> dict[str, Any]:
    """Permuted model vs source (same function) and short-prompt runtime vs uncompressed."""
    from kvcompile.runtime.model import exact_attention

    source = loaded.build()
    exact = exact_attention(loaded.arch)
    ids = torch.tensor([loaded.tokenizer(PARITY_PROMPT)["input_ids"]])

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

    compiled = run_passes(CompiledModel(loaded.arch, loaded.config, loaded.state, plan), DEFAULT_PASSES)
    model = CompactLM.from_state_dict(loaded.arch, loaded.config, compiled.state)
    return compiled, Engine(model, compiled.plan, loaded.tokenizer, max_context=max_context)


def build_artifact(loaded: LoadedModel, profile: Profile, out_dir: Path, force: bool = False,
                   max_context: int | None = None) -> dict[str, Any]:
    """Compile ``loaded`` with ``profile`` into ``out_dir``; returns the build report."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ArtifactError(f"{out_dir} already exists; pass --force to replace it")
    check_profile_matches(profile, loaded)
    compiled, engine = compile_engine(loaded, profile.plan, max_context)
    parity = parity_checks(loaded, compiled, engine)
    if not parity["passed"]:
        raise ArtifactError(f"parity checks failed, nothing written: {parity}")
    arch = loaded.arch
    context = engine.max_context
    cache = engine.allocate(1, max_context=context)
    allocated = cache.nbytes
    predicted = plan_bytes(compiled.plan, arch, context, 4)
    del cache
    report = {
        "format": "kvcompile-build-report/1",
        "parity": parity,
        "passes": compiled.log,
        "memory": {
            "max_context": context,
            "allocated_kv_bytes": allocated,
            "predicted_kv_bytes": predicted,
            "equal": allocated == predicted,
            "table": memory_table(compiled.plan, arch, 4, extra=(context,)),
        },
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        _write_files(tmp, loaded, profile, compiled, report, context)
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


def _write_files(tmp: Path, loaded: LoadedModel, profile: Profile, compiled: CompiledModel,
                 report: dict[str, Any], max_context: int) -> None:
    from kvcompile.profile_io import profile_to_dict

    save_file({k: v.contiguous() for k, v in compiled.state.items()}, str(tmp / WEIGHTS),
              metadata={"format": "pt", "kvcompile": ARTIFACT_FORMAT})
    (tmp / "config.json").write_text(json.dumps(_config_dict(loaded.config), indent=2, sort_keys=True))
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
        "dtype": "float32",
        "max_context": max_context,
        "attention": compiled.attention,
        "passes": compiled.log,
        "plan": plan_to_dict(compiled.plan),
        "files": files,
    }
    atomic_write_text(tmp / MANIFEST, dump_yaml(manifest))


def read_manifest(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"artifact {directory} does not exist; build one with `kvcompile build`")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST}: not a kvcompile artifact (or an interrupted copy)")
    try:
        manifest = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid YAML; rebuild the artifact") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a manifest mapping; rebuild the artifact")
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(
            f"{path}: format {manifest.get('format')!r} is not {ARTIFACT_FORMAT!r}; "
            f"rebuild with this kvcompile ({__version__})"
        )
    if not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path}: files: missing; rebuild the artifact")
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    for name, expected in manifest["files"].items():
        path = Path(directory) / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing from the artifact; rebuild it")
        if sha256_file(path) != expected:
            raise ArtifactError(f"{path} does not match its sha256 in {MANIFEST} (corrupt or modified); rebuild the artifact")


def _check_source_fingerprint(directory: Path, manifest: dict[str, Any]) -> None:
    """The manifest and the bundled profile must name the same source model."""
    profile = yaml.safe_load((Path(directory) / "profile.yaml").read_text(encoding="utf-8"))
    expected = (manifest.get("source_model") or {}).get("fingerprint")
    found = (profile.get("model") or {}).get("fingerprint") if isinstance(profile, dict) else None
    if expected is None or expected != found:
        raise ArtifactError(
            f"{directory}: the manifest's source fingerprint does not match profile.yaml's; rebuild the artifact"
        )


def artifact_plan(manifest: dict[str, Any], source: str) -> Plan:
    return plan_from_dict(manifest.get("plan"), _Reader(source))


def load_engine(directory: Path, verify: bool = True, max_context: int | None = None):
    """Verified artifact -> runtime Engine (see ``kvcompile.runtime.load``)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from kvcompile.arch import arch_from_config
    from kvcompile.runtime.engine import Engine
    from kvcompile.runtime.model import CompactLM

    hf_logging.set_verbosity_error()
    directory = Path(directory)
    manifest = read_manifest(directory)
    if verify:
        verify_files(directory, manifest)
        _check_source_fingerprint(directory, manifest)
    try:
        plan = artifact_plan(manifest, str(directory / MANIFEST))
    except ProfileError as exc:
        raise ArtifactError(str(exc)) from exc
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    state = load_file(str(directory / WEIGHTS))  # its bytes were checked by sha256 above
    arch = arch_from_config(config)
    model = CompactLM.from_state_dict(arch, config, state)
    context = max_context or int(manifest.get("max_context") or arch.max_context)
    engine = Engine(model, plan, tokenizer, max_context=context)
    engine.manifest = manifest
    return engine
