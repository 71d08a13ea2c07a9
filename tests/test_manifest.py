"""The artifact's manifest and build report as records: round trips, manifests of earlier
writers, the first bad field named, and no module but the record's own reading their keys.

References: hand-written file text in the format each writer produced (key by key), and the
source tree itself for who reads which keys.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvcompile.build.report import (
    BuildReport,
    LowPrecisionCheck,
    MemoryCheck,
    OnnxBuild,
    OnnxExport,
    OnnxParity,
    ParityChecks,
    build_report_from_dict,
    build_report_json,
)
from kvcompile.errors import ArtifactError
from kvcompile.plan import BudgetLayout, LayerPlan, Plan, Selection
from kvcompile.runtime.manifest import (
    Manifest,
    OnnxGraphs,
    SourceModel,
    manifest_from_dict,
    manifest_to_dict,
)
from kvcompile.yamlio import dump_yaml

ROOT = Path(__file__).resolve().parents[1]
PLAN = Plan((LayerPlan((2,), (0, 1, 3), BudgetLayout(4, 1, 8, 19)),
             LayerPlan((0, 1, 2, 3), (), None)), selection=Selection("key_norm", observation_window=8))
FINGERPRINT = "sha256:" + "ab" * 32
# a manifest as the writer before the ONNX graphs wrote it (no `onnx` key), byte for byte
BEFORE_ONNX = f"""\
format: kvcompile-artifact/1
kvcompile_version: 0.1.0
source_model:
  source: default
  name: SmolLM2-135M-Instruct
  fingerprint: {FINGERPRINT}
weights_fingerprint: sha256:{"cd" * 32}
dtype: float32
max_context: 8192
attention: kvcompile.budgeted_attention
passes:
- permute-heads
- install-budgeted-attention
plan:
  policy: profiled
  selection: key_norm
  observation_window: 8
  layers:
  - {{layer: 0, full: [2], budgeted: [0, 1, 3], sinks: 4, compensation: 1, selected: 8, window: 19, sliding: false}}
  - {{layer: 1, full: [0, 1, 2, 3], budgeted: [], sinks: 0, compensation: 0, selected: 0, window: 0, sliding: false}}
files:
  model.safetensors: {"0a" * 32}
  profile.yaml: {"1b" * 32}
"""


def a_manifest(**changes: Any) -> Manifest:
    fields: dict[str, Any] = dict(
        source_model=SourceModel("default", "SmolLM2-135M-Instruct", FINGERPRINT),
        weights_fingerprint="sha256:" + "cd" * 32, dtype="bfloat16", max_context=4096,
        attention="kvcompile.budgeted_attention", passes=("permute-heads", "install"), plan=PLAN,
        onnx=OnnxGraphs("onnx/prefill.onnx", "onnx/decode.onnx", "onnx/weights.onnx.data", 21,
                        "kvcompile:1", "float32", 4096),
        files={"model.safetensors": "0" * 64, "onnx/decode.onnx": "2" * 64})
    fields.update(changes)
    return Manifest(**fields)


def a_report(low: bool = True, onnx: bool = True) -> BuildReport:
    return BuildReport(
        parity=ParityChecks(3e-6, 2e-5, 17, LowPrecisionCheck("bfloat16", 0.31, 0.94) if low else None),
        passes=("permute-heads", "install"),
        memory=MemoryCheck(4096, "bfloat16", 1000, 1000,
                           ({"context": 1024, "kv_bytes": 10, "uncompressed_bytes": 40, "ratio": 0.25},)),
        onnx=OnnxBuild(OnnxExport(21, "kvcompile:1", "float32", 4096, 1.5, 0.25, 0.5,
                                  {"prefill.onnx": 100}, {"decode": [{"pass": "P", "modified": True}]}),
                       OnnxParity(4e-6, 13, 4)) if onnx else None)


def test_the_manifest_round_trips_through_its_file_form() -> None:
    for manifest in (a_manifest(), a_manifest(onnx=None, dtype="float32")):
        text = dump_yaml(manifest_to_dict(manifest))
        assert manifest_from_dict(yaml.safe_load(text), "m.yaml") == manifest


def test_a_manifest_written_before_the_onnx_graphs_still_loads() -> None:
    manifest = manifest_from_dict(yaml.safe_load(BEFORE_ONNX), "old.yaml")
    assert manifest.onnx is None and manifest.plan == PLAN
    assert manifest.source_model.fingerprint == FINGERPRINT and manifest.max_context == 8192
    assert manifest.files["profile.yaml"] == "1b" * 32
    # and today's writer writes the same keys in the same order, plus `onnx`
    data = manifest_to_dict(manifest)
    assert dump_yaml(data) == BEFORE_ONNX.replace("files:", "onnx: null\nfiles:")


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    for key in keys[:-1]:
        data = data[key]
    if value is _DROP:
        del data[keys[-1]]
    else:
        data[keys[-1]] = value


_DROP = object()


@pytest.mark.parametrize(("path", "value", "named"), [
    ("format", "kvcompile-artifact/2", "kvcompile-artifact/2"),
    ("dtype", "int8", "dtype"),
    ("dtype", _DROP, "dtype"),
    ("max_context", 0, "max_context"),
    ("max_context", "8192", "max_context"),
    ("source_model.fingerprint", _DROP, "source_model.fingerprint"),
    ("source_model", ["default"], "source_model"),
    ("files", ["model.safetensors"], "files"),
    ("files.model.safetensors", 7, "files.model"),  # a digest that is not a string
    ("passes", "permute-heads", "passes"),
    ("plan.selection", "random", "plan"),
    ("onnx", {"prefill": "onnx/prefill.onnx"}, "onnx.decode"),
    ("onnx", "yes", "onnx"),
])
def test_a_bad_manifest_field_is_named_in_one_line(path: str, value: Any, named: str) -> None:
    data = yaml.safe_load(BEFORE_ONNX)
    if path == "files.model.safetensors":
        data["files"]["model.safetensors"] = value
    else:
        _set(data, path, value)
    with pytest.raises(ArtifactError, match=re.escape(named)) as info:
        manifest_from_dict(data, "art/manifest.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("art/manifest.yaml") and "rebuild" in message


def test_a_manifest_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(ArtifactError, match="mapping"):
        manifest_from_dict(["format"], "m.yaml")


def test_the_build_report_round_trips_and_keeps_its_keys() -> None:
    for report in (a_report(), a_report(low=False, onnx=False)):
        text = build_report_json(report)
        assert build_report_from_dict(json.loads(text), "r.json") == report
    data = json.loads(build_report_json(a_report()))
    # the file keys every earlier build report has (tests/test_onnx_backend reads them too)
    assert data["format"] == "kvcompile-build-report/1"
    assert data["parity"] == {
        "permuted_vs_source_max_abs_logit_diff": 3e-6,
        "runtime_vs_uncompressed_within_capacity_max_abs_logit_diff": 2e-5,
        "prompt_tokens": 17, "passed": True,
        "low_precision": {"dtype": "bfloat16", "max_abs_logit_diff_vs_float32": 0.31,
                          "greedy_agreement_vs_float32": 0.94, "passed": True}}
    assert data["memory"]["equal"] is True and data["memory"]["table"][0]["ratio"] == 0.25
    assert data["onnx"]["parity"] == {"onnxruntime_vs_torch_runtime_max_abs_logit_diff": 4e-6,
                                      "prompt_tokens": 13, "decode_steps": 4, "passed": True}
    assert set(data["onnx"]) == {"opset", "domain", "dtype", "max_context", "export_s", "passes_s",
                                 "save_s", "file_bytes", "passes", "parity"}


@pytest.mark.parametrize(("diffs", "agreement", "passed"), [
    ((5e-5, 5e-4), None, True), ((2e-4, 5e-4), None, False), ((5e-5, 2e-3), None, False),
    ((5e-5, 5e-4), 0.8, True), ((5e-5, 5e-4), 0.75, False)])
def test_parity_passes_only_within_every_tolerance(diffs, agreement, passed) -> None:
    low = None if agreement is None else LowPrecisionCheck("float16", 0.1, agreement)
    assert ParityChecks(*diffs, 10, low).passed is passed
    assert OnnxParity(9e-4, 3, 4).passed and not OnnxParity(1.1e-3, 3, 4).passed


def test_a_bad_build_report_field_is_named() -> None:
    data = json.loads(build_report_json(a_report()))
    broken = copy.deepcopy(data)
    broken["memory"]["allocated_kv_bytes"] = "1000"
    with pytest.raises(ArtifactError, match=r"memory\.allocated_kv_bytes"):
        build_report_from_dict(broken, "r.json")
    broken = copy.deepcopy(data)
    del broken["onnx"]["parity"]["decode_steps"]
    with pytest.raises(ArtifactError, match=r"onnx\.parity\.decode_steps"):
        build_report_from_dict(broken, "r.json")


# keys only their record's module may spell (generic ones like `dtype` are not searchable)
RECORD_KEYS = {
    "runtime/manifest.py": ("source_model", "weights_fingerprint"),
    "kvcompile/build/report.py": ("permuted_vs_source_max_abs_logit_diff",
                                  "runtime_vs_uncompressed_within_capacity",
                                  "greedy_agreement_vs_float32", "max_abs_logit_diff_vs_float32",
                                  "onnxruntime_vs_torch_runtime", "allocated_kv_bytes",
                                  "predicted_kv_bytes", "low_precision"),
}


def test_only_the_records_module_reads_their_keys() -> None:
    """Outside tests (which check the files independently), the manifest's and the build
    report's keys appear in their record's module only: nobody re-parses them ad hoc."""
    sources = [p for folder in ("kvcompile", "runtime", "passes", "bench")
               for p in (ROOT / folder).rglob("*.py")] + [ROOT / "cli.py"]
    assert ROOT / "runtime" / "manifest.py" in sources
    for owner, keys in RECORD_KEYS.items():
        for path in sources:
            if path == ROOT / owner or path.is_symlink():
                continue
            text = path.read_text(encoding="utf-8")
            for key in keys:
                assert not re.search(rf"[\"']{key}", text), f"{path.relative_to(ROOT)} reads {key!r}"


def test_a_build_report_from_before_build_dtype_reads_as_float32() -> None:
    """The first writer's report, key for key: no memory.dtype (everything was float32)."""
    first = {"format": "kvcompile-build-report/1",
             "parity": {"permuted_vs_source_max_abs_logit_diff": 1e-6,
                        "runtime_vs_uncompressed_within_capacity_max_abs_logit_diff": 2e-5,
                        "prompt_tokens": 20, "passed": True},
             "passes": ["permute-heads", "install-budgeted-attention"],
             "memory": {"max_context": 8192, "allocated_kv_bytes": 5, "predicted_kv_bytes": 5,
                        "equal": True, "table": [{"context": 1024, "kv_bytes": 5,
                                                  "uncompressed_bytes": 20, "ratio": 0.25}]}}
    report = build_report_from_dict(first, "old.json")
    assert report.memory.dtype == "float32" and report.onnx is None
    assert report.parity.low_precision is None and report.parity.passed and report.memory.equal
