"""The build report (``build-report.json``, format ``kvcompile-build-report/1``): one record,
one writer, one reader.

``kvcompile build`` makes a :class:`BuildReport` (parity checks, passes, KV memory, the ONNX
graphs' export and parity), writes it with :func:`build_report_to_dict` and prints it;
``kvcompile inspect`` reads it back with :func:`read_build_report`. No other module reads its
keys. The memory table's rows are ``memory.memory_table``'s at ``memory.baseline_dtype``,
carried as they are; the allocated and predicted bytes are at ``memory.dtype``, the stored
precision. Every ``kvcompile-build-report/1`` written so far reads (``memory.dtype`` came with
``--dtype``, ``memory.baseline_dtype`` with the byte definition of ``kvcompile.memory``).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcompile.errors import ArtifactError, ProfileError
from kvcompile.plan_io import Reader

BUILD_REPORT = "build-report.json"
BUILD_REPORT_FORMAT = "kvcompile-build-report/1"
PERMUTED_TOLERANCE = 1e-4  # max |logit diff|, permuted model vs source (the same function)
WITHIN_CAPACITY_TOLERANCE = 1e-3  # runtime vs uncompressed while the prompt fits every budget
LOW_PRECISION_MIN_AGREEMENT = 0.8  # greedy tokens of the parity prompt that must survive the cast
ONNX_PARITY_TOLERANCE = 1e-3  # max |logit diff| onnxruntime vs the torch runtime at build time
_NUMBER = (int, float)


@dataclass(frozen=True)
class LowPrecisionCheck:
    """The stored precision against float32 on the parity prompt."""

    dtype: str
    max_abs_logit_diff: float
    greedy_agreement: float

    @property
    def passed(self) -> bool:
        return self.greedy_agreement >= LOW_PRECISION_MIN_AGREEMENT


@dataclass(frozen=True)
class ParityChecks:
    """Permuted model vs source (same function) and runtime vs uncompressed within capacity."""

    permuted_vs_source: float  # max |logit diff|
    runtime_vs_uncompressed: float  # max |logit diff|, prompt + decode steps within capacity
    prompt_tokens: int
    low_precision: LowPrecisionCheck | None = None  # only for a dtype other than float32

    @property
    def passed(self) -> bool:
        return (self.permuted_vs_source < PERMUTED_TOLERANCE
                and self.runtime_vs_uncompressed < WITHIN_CAPACITY_TOLERANCE
                and (self.low_precision is None or self.low_precision.passed))


@dataclass(frozen=True)
class MemoryCheck:
    """The KV buffers allocated at ``max_context`` against what the plan predicts."""

    max_context: int
    dtype: str
    allocated_kv_bytes: int  # all KV state at ``dtype`` (what the runtime allocates)
    predicted_kv_bytes: int  # memory.plan_bytes at ``dtype``'s bytes per value
    table: tuple[Mapping[str, Any], ...]  # memory.memory_table rows at ``baseline_dtype``
    # the dtype the table's ratios count values at; None: a report from before the byte
    # definition, whose table counted keys and values alone at ``dtype``
    baseline_dtype: str | None = None

    @property
    def equal(self) -> bool:
        return self.allocated_kv_bytes == self.predicted_kv_bytes


@dataclass(frozen=True)
class OnnxParity:
    """The written graphs in onnxruntime against the torch runtime: prefill, decode steps."""

    max_abs_logit_diff: float
    prompt_tokens: int
    decode_steps: int

    @property
    def passed(self) -> bool:
        return self.max_abs_logit_diff < ONNX_PARITY_TOLERANCE


@dataclass(frozen=True)
class OnnxExport:
    """What ``build.onnx_graphs.write_onnx`` wrote: the graphs' target, times, file sizes and
    which static-budget passes changed each graph."""

    opset: int
    domain: str  # the kvcompile op domain and its version
    dtype: str
    max_context: int
    export_s: float
    passes_s: float
    save_s: float
    file_bytes: Mapping[str, int]
    passes: Mapping[str, Sequence[Mapping[str, Any]]]  # graph -> [{pass, modified}]


@dataclass(frozen=True)
class OnnxBuild:
    export: OnnxExport
    parity: OnnxParity


@dataclass(frozen=True)
class BuildReport:
    parity: ParityChecks
    passes: tuple[str, ...]
    memory: MemoryCheck
    onnx: OnnxBuild | None = None  # None: built with --no-onnx


def build_report_to_dict(report: BuildReport) -> dict[str, Any]:
    parity = report.parity
    parity_data: dict[str, Any] = {
        "permuted_vs_source_max_abs_logit_diff": parity.permuted_vs_source,
        "runtime_vs_uncompressed_within_capacity_max_abs_logit_diff": parity.runtime_vs_uncompressed,
        "prompt_tokens": parity.prompt_tokens,
        "passed": parity.passed,
    }
    low = parity.low_precision
    if low is not None:
        parity_data["low_precision"] = {
            "dtype": low.dtype, "max_abs_logit_diff_vs_float32": low.max_abs_logit_diff,
            "greedy_agreement_vs_float32": low.greedy_agreement, "passed": low.passed}
    memory = report.memory
    data: dict[str, Any] = {
        "format": BUILD_REPORT_FORMAT,
        "parity": parity_data,
        "passes": list(report.passes),
        "memory": {
            "max_context": memory.max_context, "dtype": memory.dtype,
            "allocated_kv_bytes": memory.allocated_kv_bytes,
            "predicted_kv_bytes": memory.predicted_kv_bytes, "equal": memory.equal,
            "table": [dict(row) for row in memory.table],
            **({} if memory.baseline_dtype is None else {"baseline_dtype": memory.baseline_dtype}),
        },
    }
    if report.onnx is not None:
        data["onnx"] = onnx_build_to_dict(report.onnx)
    return data


def onnx_build_to_dict(onnx: OnnxBuild) -> dict[str, Any]:
    export, parity = onnx.export, onnx.parity
    return {
        "opset": export.opset, "domain": export.domain, "dtype": export.dtype,
        "max_context": export.max_context, "export_s": export.export_s,
        "passes_s": export.passes_s, "save_s": export.save_s,
        "file_bytes": dict(export.file_bytes),
        "passes": {graph: [dict(entry) for entry in log] for graph, log in export.passes.items()},
        "parity": {
            "onnxruntime_vs_torch_runtime_max_abs_logit_diff": parity.max_abs_logit_diff,
            "prompt_tokens": parity.prompt_tokens, "decode_steps": parity.decode_steps,
            "passed": parity.passed},
    }


def build_report_json(report: BuildReport) -> str:
    return json.dumps(build_report_to_dict(report), indent=2)


def build_report_from_dict(data: Any, source: str) -> BuildReport:
    """A parsed ``build-report.json`` -> :class:`BuildReport`; a :class:`ArtifactError` naming
    the first bad field."""
    reader = Reader(source)
    try:
        data = reader.mapping(data, "build report")
        if data.get("format") != BUILD_REPORT_FORMAT:
            raise reader.fail("format", f"{data.get('format')!r} is not {BUILD_REPORT_FORMAT!r}")
        parity = reader.get(data, "parity", "", dict)
        low = parity.get("low_precision")
        if low is not None:
            low = reader.mapping(low, "parity.low_precision")
            low = LowPrecisionCheck(
                dtype=reader.get(low, "dtype", "parity.low_precision", str),
                max_abs_logit_diff=float(reader.get(low, "max_abs_logit_diff_vs_float32",
                                                    "parity.low_precision", _NUMBER)),
                greedy_agreement=float(reader.get(low, "greedy_agreement_vs_float32",
                                                  "parity.low_precision", _NUMBER)))
        memory = reader.get(data, "memory", "", dict)
        table = reader.get(memory, "table", "memory", list)
        for i, row in enumerate(table):
            reader.mapping(row, f"memory.table[{i}]")
        passes = reader.get(data, "passes", "", list)
        for i, name in enumerate(passes):
            if not isinstance(name, str):
                raise reader.fail(f"passes[{i}]", f"expected a string, got {name!r}")
        onnx = data.get("onnx")
        return BuildReport(
            parity=ParityChecks(
                permuted_vs_source=float(reader.get(
                    parity, "permuted_vs_source_max_abs_logit_diff", "parity", _NUMBER)),
                runtime_vs_uncompressed=float(reader.get(
                    parity, "runtime_vs_uncompressed_within_capacity_max_abs_logit_diff", "parity",
                    _NUMBER)),
                prompt_tokens=reader.get(parity, "prompt_tokens", "parity", int),
                low_precision=low),
            passes=tuple(passes),
            memory=MemoryCheck(
                max_context=reader.get(memory, "max_context", "memory", int),
                # reports from before `build --dtype` stored float32 and did not say so
                dtype=reader.get(memory, "dtype", "memory", str) if "dtype" in memory else "float32",
                allocated_kv_bytes=reader.get(memory, "allocated_kv_bytes", "memory", int),
                predicted_kv_bytes=reader.get(memory, "predicted_kv_bytes", "memory", int),
                table=tuple(table),
                baseline_dtype=(reader.get(memory, "baseline_dtype", "memory", str)
                                if "baseline_dtype" in memory else None)),
            onnx=None if onnx is None else _onnx_from_dict(reader, reader.mapping(onnx, "onnx")),
        )
    except ProfileError as exc:
        raise ArtifactError(f"{exc}; rebuild the artifact with `kvcompile build`") from exc


def _onnx_from_dict(reader: Reader, data: dict[str, Any]) -> OnnxBuild:
    parity = reader.get(data, "parity", "onnx", dict)
    path = "onnx.parity"
    export = OnnxExport(
        opset=reader.get(data, "opset", "onnx", int),
        domain=reader.get(data, "domain", "onnx", str),
        dtype=reader.get(data, "dtype", "onnx", str),
        max_context=reader.get(data, "max_context", "onnx", int),
        **{key: float(reader.get(data, key, "onnx", _NUMBER))
           for key in ("export_s", "passes_s", "save_s")},
        file_bytes=reader.get(data, "file_bytes", "onnx", dict),
        passes=reader.get(data, "passes", "onnx", dict),
    )
    return OnnxBuild(export, OnnxParity(
        max_abs_logit_diff=float(reader.get(
            parity, "onnxruntime_vs_torch_runtime_max_abs_logit_diff", path, _NUMBER)),
        prompt_tokens=reader.get(parity, "prompt_tokens", path, int),
        decode_steps=reader.get(parity, "decode_steps", path, int)))


def read_build_report(artifact: Path) -> BuildReport:
    """``ARTIFACT/build-report.json`` (the artifact itself is verified by ``open_artifact``)."""
    path = Path(artifact) / BUILD_REPORT
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} cannot be read as JSON; rebuild the artifact") from exc
    return build_report_from_dict(data, str(path))
