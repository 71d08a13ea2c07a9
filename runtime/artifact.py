"""Read an artifact directory (``kvcompile-artifact/1``) verified, and serve it.

The reader lives with the runtime so that a deployment loads an artifact with the runtime
alone: nothing here imports the profiler, the fit, calibration or evaluation (the writer,
``kvcompile.build.artifact``, stays with the build). Loading checks the format version, every
file's sha256 and that the manifest and the bundled profile name the same source model
before anything runs.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kvcompile import __version__
from kvcompile.errors import ArtifactError, ProfileError
from kvcompile.plan import Plan
from kvcompile.plan_io import Reader, plan_from_dict

if TYPE_CHECKING:  # imported where used: the onnxruntime backend reads manifests without torch
    import torch

ARTIFACT_FORMAT = "kvcompile-artifact/1"
MANIFEST = "manifest.yaml"
WEIGHTS = "model.safetensors"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def check_source_fingerprint(directory: Path, manifest: dict[str, Any]) -> None:
    """The manifest and the bundled profile must name the same source model."""
    profile = yaml.safe_load((Path(directory) / "profile.yaml").read_text(encoding="utf-8"))
    expected = (manifest.get("source_model") or {}).get("fingerprint")
    found = (profile.get("model") or {}).get("fingerprint") if isinstance(profile, dict) else None
    if expected is None or expected != found:
        raise ArtifactError(
            f"{directory}: the manifest's source fingerprint does not match profile.yaml's; rebuild the artifact"
        )


def artifact_plan(manifest: dict[str, Any], source: str) -> Plan:
    try:
        return plan_from_dict(manifest.get("plan"), Reader(source))
    except ProfileError as exc:
        raise ArtifactError(str(exc)) from exc


def artifact_dtype(manifest: dict[str, Any]) -> torch.dtype:
    """The precision the artifact's weights are stored in (``kvcompile build --dtype``)."""
    from kvcompile.runtime.placement import resolve_dtype

    try:
        return resolve_dtype(manifest.get("dtype", "float32"))
    except Exception as exc:
        raise ArtifactError(f"{MANIFEST}: dtype {manifest.get('dtype')!r} is not one kvcompile "
                            f"serves; rebuild the artifact") from exc


def load_engine(directory: Path, verify: bool = True, max_context: int | None = None,
                device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
    """Verified artifact -> runtime Engine (see ``kvcompile.runtime.load``).

    ``dtype`` defaults to the precision the artifact stores; weights, buffers and the cache
    counters live on ``device`` (default CPU).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from kvcompile.arch import arch_from_config
    from kvcompile.runtime.engine import Engine
    from kvcompile.runtime.model import CompactLM
    from kvcompile.runtime.placement import resolve_device, resolve_dtype

    target = resolve_device(device)
    if target.type == "cuda":  # the Triton kernels serve the kvcompile ops from here on
        from kvcompile.runtime import kernels

        kernels.enable()
    hf_logging.set_verbosity_error()
    directory = Path(directory)
    manifest = read_manifest(directory)
    if verify:
        verify_files(directory, manifest)
        check_source_fingerprint(directory, manifest)
    plan = artifact_plan(manifest, str(directory / MANIFEST))
    wanted = resolve_dtype(dtype, default=artifact_dtype(manifest))
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    state = load_file(str(directory / WEIGHTS), device=str(target))  # bytes checked by sha256 above
    state = {name: tensor.to(wanted) if tensor.is_floating_point() else tensor
             for name, tensor in state.items()}
    arch = arch_from_config(config)
    model = CompactLM.from_state_dict(arch, config, state)
    context = max_context or int(manifest.get("max_context") or arch.max_context)
    engine = Engine(model, plan, tokenizer, max_context=context)
    engine.manifest = manifest
    return engine
