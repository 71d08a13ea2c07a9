"""The artifact's manifest (``manifest.yaml``, format ``kvcompile-artifact/1``): one record,
one writer, one reader.

The build writes a :class:`Manifest` with :func:`manifest_to_dict`; the runtime reads it with
:func:`manifest_from_dict`, which checks every field (``plan_io.Reader``) and names the first
bad one. No other module reads the manifest's keys. Torch-free: the onnxruntime backend reads
manifests without torch.

Compatibility: every ``kvcompile-artifact/1`` manifest written so far loads. The ``onnx``
section came later, so a manifest without it reads as one built without ONNX graphs; keys this
reader does not know are ignored.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvcompile import __version__
from kvcompile.errors import ArtifactError, ProfileError
from kvcompile.plan import Plan
from kvcompile.plan_io import Reader, plan_from_dict, plan_to_dict

ARTIFACT_FORMAT = "kvcompile-artifact/1"
MANIFEST = "manifest.yaml"
# the precisions an artifact's weights may be stored in (``runtime.placement.DTYPES``' names;
# listed here so that reading a manifest needs no torch)
STORED_DTYPES = ("float32", "bfloat16", "float16")
_REBUILD = "rebuild the artifact with `kvcompile build`"


@dataclass(frozen=True)
class SourceModel:
    """The model the artifact was compiled from (``kvcompile build MODEL``)."""

    source: str  # what was passed as MODEL
    name: str
    fingerprint: str  # sha256 of the source weights; the bundled profile names the same


@dataclass(frozen=True)
class OnnxGraphs:
    """The ``onnx/`` graphs: paths relative to the artifact, and what they were built for."""

    prefill: str
    decode: str
    weights: str  # the external-data file both graphs read
    opset: int
    domain: str  # the kvcompile op domain and its version, ``kvcompile:1``
    dtype: str
    max_context: int  # slots of every full-head buffer in the graphs


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.yaml`` states about an artifact directory."""

    source_model: SourceModel
    weights_fingerprint: str
    dtype: str  # the stored weights' precision, one of STORED_DTYPES
    max_context: int  # the context the artifact serves by default
    attention: str
    passes: tuple[str, ...]
    plan: Plan
    onnx: OnnxGraphs | None  # None: built with --no-onnx (or before the graphs existed)
    files: Mapping[str, str] = field(default_factory=dict)  # relative path -> sha256 hex
    kvcompile_version: str = __version__
    format: str = ARTIFACT_FORMAT

    def __post_init__(self) -> None:
        if self.dtype not in STORED_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(STORED_DTYPES)}")


def manifest_to_dict(manifest: Manifest) -> dict[str, Any]:
    """The file form (key order as written since the format's first version)."""
    onnx = manifest.onnx
    return {
        "format": manifest.format,
        "kvcompile_version": manifest.kvcompile_version,
        "source_model": {"source": manifest.source_model.source, "name": manifest.source_model.name,
                         "fingerprint": manifest.source_model.fingerprint},
        "weights_fingerprint": manifest.weights_fingerprint,
        "dtype": manifest.dtype,
        "max_context": manifest.max_context,
        "attention": manifest.attention,
        "passes": list(manifest.passes),
        "plan": plan_to_dict(manifest.plan),
        "onnx": None if onnx is None else {
            "prefill": onnx.prefill, "decode": onnx.decode, "weights": onnx.weights,
            "opset": onnx.opset, "domain": onnx.domain, "dtype": onnx.dtype,
            "max_context": onnx.max_context},
        "files": dict(manifest.files),
    }


def manifest_from_dict(data: Any, source: str) -> Manifest:
    """A parsed ``manifest.yaml`` -> :class:`Manifest`; an :class:`ArtifactError` naming the
    first bad field (``source`` names the file in the message)."""
    reader = Reader(source)
    try:
        data = reader.mapping(data, "manifest")
        found = data.get("format")
        if found != ARTIFACT_FORMAT:
            raise ArtifactError(f"{source}: format {found!r} is not {ARTIFACT_FORMAT!r}; rebuild "
                                f"with this kvcompile ({__version__})")
        files = reader.get(data, "files", "", dict)
        for name, digest in files.items():
            if not isinstance(name, str) or not isinstance(digest, str):
                raise reader.fail(f"files.{name}", f"expected a sha256 string, got {digest!r}")
        model = reader.get(data, "source_model", "", dict)
        onnx = data.get("onnx")
        manifest = Manifest(
            format=found,
            kvcompile_version=reader.get(data, "kvcompile_version", "", str),
            source_model=SourceModel(*(reader.get(model, key, "source_model", str)
                                       for key in ("source", "name", "fingerprint"))),
            weights_fingerprint=reader.get(data, "weights_fingerprint", "", str),
            dtype=_dtype(reader, data),
            max_context=_positive(reader, data, "max_context", ""),
            attention=reader.get(data, "attention", "", str),
            passes=tuple(_strings(reader, data, "passes")),
            plan=plan_from_dict(data.get("plan"), reader),
            onnx=None if onnx is None else _onnx(reader, reader.mapping(onnx, "onnx")),
            files=dict(files),
        )
    except ProfileError as exc:
        raise ArtifactError(f"{exc}; {_REBUILD}") from exc
    return manifest


def _dtype(reader: Reader, data: dict[str, Any]) -> str:
    dtype = reader.get(data, "dtype", "", str)
    if dtype not in STORED_DTYPES:
        raise reader.fail("dtype", f"{dtype!r} is not one kvcompile serves "
                                   f"({', '.join(STORED_DTYPES)})")
    return dtype


def _positive(reader: Reader, data: dict[str, Any], key: str, path: str) -> int:
    value = reader.get(data, key, path, int)
    if value < 1:
        raise reader.fail(f"{path}.{key}" if path else key, f"expected a positive integer, got {value}")
    return value


def _strings(reader: Reader, data: dict[str, Any], key: str) -> list[str]:
    values = reader.get(data, key, "", list)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise reader.fail(f"{key}[{i}]", f"expected a string, got {value!r}")
    return values


def _onnx(reader: Reader, data: dict[str, Any]) -> OnnxGraphs:
    return OnnxGraphs(
        **{key: reader.get(data, key, "onnx", str)
           for key in ("prefill", "decode", "weights", "domain", "dtype")},
        opset=reader.get(data, "opset", "onnx", int),
        max_context=_positive(reader, data, "max_context", "onnx"),
    )
