"""Open an artifact directory (``kvcompile-artifact/1``) verified, and serve it.

The reader lives with the runtime so that a deployment loads an artifact with the runtime
alone: nothing here imports the profiler, the fit, calibration or evaluation (the writer,
``kvcompile.build.artifact``, stays with the build). :func:`open_artifact` is the one
verify-and-open sequence every backend runs before anything is served: the manifest's format,
fields, plan and stored dtype (``runtime.manifest``), every file's sha256, and that the
manifest and the bundled profile name the same source model.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from kvcompile.errors import ArtifactError
from kvcompile.runtime.manifest import ARTIFACT_FORMAT, MANIFEST, Manifest, manifest_from_dict

if TYPE_CHECKING:  # imported where used: the onnxruntime backend opens artifacts without torch
    import torch

    from kvcompile.runtime.engine import Engine

__all__ = ["ARTIFACT_FORMAT", "MANIFEST", "PROFILE", "WEIGHTS", "load_engine", "open_artifact",
           "read_manifest", "sha256_file", "verify_files"]
WEIGHTS = "model.safetensors"
PROFILE = "profile.yaml"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_artifact(directory: Path, verify: bool = True) -> Manifest:
    """The artifact's checked manifest; with ``verify``, also every file's checksum and the
    bundled profile's source model. Raises :class:`ArtifactError` (one line) on any mismatch."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if verify:
        verify_files(directory, manifest)
        check_source_fingerprint(directory, manifest)
    return manifest


def read_manifest(directory: Path) -> Manifest:
    """``DIR/manifest.yaml`` read and checked field by field (no checksums)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"artifact {directory} does not exist; build one with `kvcompile build`")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST}: not a kvcompile artifact (or an interrupted copy)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid YAML; rebuild the artifact") from exc
    return manifest_from_dict(data, str(path))


def verify_files(directory: Path, manifest: Manifest) -> None:
    for name, expected in manifest.files.items():
        path = Path(directory) / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing from the artifact; rebuild it")
        if sha256_file(path) != expected:
            raise ArtifactError(f"{path} does not match its sha256 in {MANIFEST} (corrupt or modified); rebuild the artifact")


def check_source_fingerprint(directory: Path, manifest: Manifest) -> None:
    """The manifest and the bundled profile must name the same source model."""
    path = Path(directory) / PROFILE
    try:
        profile = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} cannot be read; rebuild the artifact") from exc
    model = profile.get("model") if isinstance(profile, dict) else None
    found = model.get("fingerprint") if isinstance(model, dict) else None
    if manifest.source_model.fingerprint != found:
        raise ArtifactError(
            f"{directory}: the manifest's source fingerprint does not match {PROFILE}'s; rebuild the artifact"
        )


def load_engine(directory: Path, verify: bool = True, max_context: int | None = None,
                device: str | torch.device | None = None,
                dtype: str | torch.dtype | None = None) -> Engine:
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
    manifest = open_artifact(directory, verify)
    wanted = resolve_dtype(dtype, default=resolve_dtype(manifest.dtype))
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    state = load_file(str(directory / WEIGHTS), device=str(target))  # bytes checked by sha256 above
    state = {name: tensor.to(wanted) if tensor.is_floating_point() else tensor
             for name, tensor in state.items()}
    arch = arch_from_config(config)
    model = CompactLM.from_state_dict(arch, config, state)
    engine = Engine(model, manifest.plan, tokenizer, max_context=max_context or manifest.max_context)
    engine.manifest = manifest
    return engine
