"""The ONNX graphs in an artifact and the onnxruntime backend, on a tiny model.

References: the torch engine of the same artifact (tokens, cache bytes) and onnxruntime's own
report of a scatter that had to copy its input (the in-place check's control).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from click.testing import CliRunner

from kvcompile.build.artifact import MANIFEST, build_artifact, sha256_file
from kvcompile.build.report import read_build_report
from kvcompile.cli import main
from kvcompile.errors import ArtifactError, KVCompileError
from kvcompile.models import load_model
from kvcompile.profile.record import save_profile
from kvcompile.runtime import load, onnx_io
from kvcompile.runtime.cache import StaticKVCache
from kvcompile.runtime.onnx_backend import OnnxEngine
from tests.test_profile_io import saved_tiny_model

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 96
PROMPT = [5, 9, 11, 3, 40, 41, 7, 7, 19, 23, 60, 12, 8, 30, 31, 32, 33, 70, 71, 72]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A tiny qwen2 model, its profile, and its artifact with and without the ONNX graphs."""
    root = tmp_path_factory.mktemp("onnx-backend")
    source, loaded, profile = saved_tiny_model(root)
    save_profile(profile, root / "profile.yaml")
    build_artifact(loaded, profile, root / "with-onnx", max_context=CONTEXT)
    build_artifact(loaded, profile, root / "no-onnx", max_context=CONTEXT, onnx=False)
    return {"model": source, "profile": root / "profile.yaml", "onnx": root / "with-onnx",
            "plain": root / "no-onnx"}


def test_build_writes_both_graphs_on_one_weights_file(built) -> None:
    artifact = built["onnx"]
    manifest = yaml.safe_load((artifact / MANIFEST).read_text())
    graphs = manifest["onnx"]
    assert graphs["max_context"] == CONTEXT and graphs["opset"] == onnx_io.OPSET
    for key in ("prefill", "decode", "weights"):
        assert graphs[key] in manifest["files"]  # sha256-checked like every file
    report = json.loads((artifact / "build-report.json").read_text())
    assert report["onnx"]["parity"]["passed"]
    assert report["onnx"]["parity"]["onnxruntime_vs_torch_runtime_max_abs_logit_diff"] < 1e-4
    locations = set()
    for name in (onnx_io.PREFILL_FILE, onnx_io.DECODE_FILE):
        model = onnx.load(str(artifact / "onnx" / name), load_external_data=False)
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                locations.add({e.key: e.value for e in tensor.external_data}["location"])
    assert locations == {onnx_io.WEIGHTS_FILE}
    plain = yaml.safe_load((built["plain"] / MANIFEST).read_text())
    assert plain["onnx"] is None and not (built["plain"] / "onnx").exists()
    # every file readable by the team it ships to, as the umask allows (not mkstemp's 0600)
    from kvcompile.yamlio import current_umask

    modes = {path.relative_to(artifact).as_posix(): path.stat().st_mode & 0o777
             for path in artifact.rglob("*") if path.is_file()}
    assert set(modes) >= {"model.safetensors", MANIFEST, f"onnx/{onnx_io.DECODE_FILE}"}
    assert set(modes.values()) == {0o666 & ~current_umask()}, modes


def test_onnx_backend_generates_the_torch_engines_tokens(built) -> None:
    torch_engine, onnx_engine = load(built["onnx"]), load(built["onnx"], backend="onnx")
    fed = []
    for prompt in (PROMPT, PROMPT[:3], PROMPT[::-1]):
        expected = torch_engine.generate(prompt, max_new_tokens=40)
        found = onnx_engine.generate(prompt, max_new_tokens=40)
        assert found.token_ids == expected.token_ids and found.text == expected.text
        assert found.stop_reason == expected.stop_reason
        fed.append(len(prompt) + len(found.token_ids))
    capacity = min(layer.layout.capacity for layer in onnx_engine.plan.layers if layer.layout)
    assert max(fed) > capacity  # the budgeted heads evicted tokens along the way
    # all the state the graphs hold (every cache tensor) and, per layer with full heads, the
    # length past_length stands in for: what the torch runtime allocates (kvcompile.memory)
    onnx_cache, torch_cache = onnx_engine.allocate(1), torch_engine.allocate(1, CONTEXT)
    tensors = sum(int(np.prod(value.shape())) * (8 if "int64" in value.data_type() else 4)
                  for value in onnx_cache.values.values())
    full_layers = sum(1 for layer in onnx_engine.plan.layers if layer.full_heads)
    assert full_layers > 0
    assert onnx_cache.nbytes == tensors + 8 * full_layers == torch_cache.nbytes


def test_extend_with_several_tokens_equals_the_torch_engine(built) -> None:
    torch_engine, onnx_engine = load(built["onnx"]), load(built["onnx"], backend="onnx")
    ids = np.array([PROMPT, PROMPT[::-1]])
    torch_cache, onnx_cache = torch_engine.allocate(2, CONTEXT), onnx_engine.allocate(2)
    torch_engine.prefill(torch.from_numpy(ids[:, :12]), [torch_cache])
    onnx_engine.prefill(ids[:, :12], [onnx_cache])
    expected = torch_engine.extend(torch.from_numpy(ids[:, 12:]), torch_cache, all_logits=True)
    found = onnx_engine.extend(ids[:, 12:], onnx_cache, all_logits=True)
    np.testing.assert_allclose(found, expected.numpy(), atol=1e-4, rtol=0)
    assert onnx_cache.length == ids.shape[1]


def test_decode_step_writes_the_bound_buffers_in_place(built, capfd) -> None:
    """onnxruntime reports a TensorScatter that copies its whole input; bound as input and
    output, the full heads' buffers never are. Control: a separate output buffer is copied."""
    artifact = built["onnx"]
    plain = load(artifact, backend="onnx")
    engine = OnnxEngine(artifact, plain.plan, plain.tokenizer, CONTEXT, device="cpu",
                        log_severity=2)
    assert any(spec.part == "full_key" for spec in engine.cache_specs)
    cache = engine.allocate(1)
    engine.prefill(np.array([PROMPT]), [cache])
    pointers = {spec: value.data_ptr() for spec, value in cache.values.items()}
    capfd.readouterr()
    for token in (4, 5, 6):
        engine.decode_step(np.array([[token]]), cache)
    assert "in-place optimization not activated" not in capfd.readouterr().err
    assert {spec: value.data_ptr() for spec, value in cache.values.items()} == pointers
    binding = cache.decode_binding()
    spec = next(spec for spec in engine.cache_specs if spec.part == "full_key")
    elsewhere = ort.OrtValue.ortvalue_from_shape_and_type(
        [1, *spec.shape[1:]], np.float32, "cpu", 0)
    binding.bind_ortvalue_output(spec.output_name, elsewhere)
    engine.decode_session.run_with_iobinding(binding)
    assert "in-place optimization not activated" in capfd.readouterr().err


def test_the_graphs_serve_only_their_plan(built) -> None:
    engine = load(built["onnx"], backend="onnx")
    torch_engine = load(built["onnx"])
    with pytest.raises(KVCompileError, match="only the artifact's own plan"):
        engine.allocate(1, plan=torch_engine.uncompressed_plan())
    with pytest.raises(KVCompileError, match="context"):
        engine.generate(PROMPT * 5, max_new_tokens=4)
    with pytest.raises(KVCompileError, match="float32"):
        load(built["onnx"], backend="onnx", dtype="bfloat16")


def test_no_onnx_artifact_is_refused_by_the_onnx_backend(built) -> None:
    with pytest.raises(ArtifactError, match="--no-onnx") as info:
        load(built["plain"], backend="onnx")
    assert "\n" not in str(info.value)
    result = CliRunner().invoke(main, ["run", str(built["plain"]), "--prompt", "w5 w6",
                                       "--backend", "onnx"])
    assert result.exit_code == 2 and "--no-onnx" in result.stderr


def test_a_graph_onnxruntime_cannot_load_is_one_line(built, tmp_path: Path) -> None:
    """Unverified (checksums off), a truncated graph reaches onnxruntime, whose load errors
    are not RuntimeErrors: still one ArtifactError line."""
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(built["onnx"], copy)
    graph = copy / onnx_io.ONNX_DIR / onnx_io.DECODE_FILE
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 3])
    with pytest.raises(ArtifactError, match="onnxruntime cannot load") as info:
        load(copy, backend="onnx", verify=False)
    assert "\n" not in str(info.value)


def test_a_failed_export_is_refused_naming_no_onnx(built, tmp_path: Path, monkeypatch) -> None:
    import kvcompile.build.onnx_export

    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported: data-dependent operator\nmore detail")

    monkeypatch.setattr(kvcompile.build.onnx_export, "export_source", refuse)
    out = tmp_path / "art"
    result = CliRunner().invoke(main, ["build", str(built["model"]), "--profile",
                                       str(built["profile"]), "-o", str(out)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert "ONNX export" in lines[0] and "--no-onnx" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_the_backend_module_imports_no_torch() -> None:
    script = ("import sys\nimport kvcompile.runtime.onnx_backend\n"
              "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_eval_memory_ratio_compares_the_onnx_buffers_with_the_baseline_at_their_context(
        built) -> None:
    """The graphs' buffers hold CONTEXT slots for any request, so a short request's ratio is
    the plan's at CONTEXT, not its bytes at CONTEXT over the source cache of the short request.
    Reference: a bfloat16 cache the torch runtime allocates over the bfloat16 source cache
    (the tiny qwen2 has no sliding layers: every layer caches every token)."""
    from kvcompile.eval.backends import load_for_eval
    from kvcompile.eval.evaluate import allocated_memory_ratios

    torch_engine = load(built["onnx"])
    beside = load_for_eval(built["onnx"], "onnx")
    plan, arch = torch_engine.plan, torch_engine.arch
    short = CONTEXT // 4

    def bf16_ratio(context: int) -> float:
        cache = StaticKVCache.allocate(plan, 1, context, arch.head_dim, arch.group_size,
                                       dtype=torch.bfloat16)
        return cache.nbytes / (arch.n_layers * arch.n_kv_heads * context * 2 * arch.head_dim * 2)

    assert bf16_ratio(short) != pytest.approx(bf16_ratio(CONTEXT))  # the case can tell them apart
    plans = {"artifact": plan}
    assert allocated_memory_ratios(beside, plans, short)["artifact"] == pytest.approx(
        bf16_ratio(CONTEXT))
    assert allocated_memory_ratios(torch_engine, plans, short)["artifact"] == pytest.approx(
        bf16_ratio(short))


def test_eval_beside_a_bfloat16_artifact_runs_the_baseline_in_the_graphs_float32(
        built, tmp_path: Path) -> None:
    from kvcompile.eval.backends import load_for_eval
    from kvcompile.profile.record import load_profile

    loaded = load_model(str(built["model"]), reuse=False)
    build_artifact(loaded, load_profile(built["profile"]), tmp_path / "bf16", max_context=CONTEXT,
                   dtype="bfloat16")
    assert load(tmp_path / "bf16").model.dtype == torch.bfloat16  # served as stored by default
    assert load_for_eval(tmp_path / "bf16", "onnx").torch_engine.model.dtype == torch.float32


@pytest.mark.parametrize("damage", ["checksum", "dtype", "fingerprint", "plan"])
def test_both_backends_open_an_artifact_through_one_verified_sequence(built, tmp_path: Path,
                                                                      damage: str) -> None:
    """Whatever is wrong, the torch and onnxruntime backends refuse it with the same line."""
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(built["onnx"], copy)
    manifest = yaml.safe_load((copy / MANIFEST).read_text())
    if damage == "checksum":
        config = copy / "config.json"
        config.write_text(config.read_text().replace("{", "{ ", 1))
        expected = "config.json does not match its sha256"
    elif damage == "fingerprint":
        profile = yaml.safe_load((copy / "profile.yaml").read_text())
        profile["model"]["fingerprint"] = "sha256:" + "e" * 64
        (copy / "profile.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
        manifest["files"]["profile.yaml"] = sha256_file(copy / "profile.yaml")
        expected = "source fingerprint"
    elif damage == "dtype":
        manifest["dtype"] = "int8"
        expected = "dtype: 'int8' is not one kvcompile serves"
    else:
        manifest["plan"]["layers"][0]["layer"] = 5
        expected = "plan.layers[0].layer"
    (copy / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False))
    lines = []
    for backend in ("torch", "onnx"):
        with pytest.raises(ArtifactError, match=re.escape(expected)) as info:
            load(copy, backend=backend)
        lines.append(str(info.value))
    assert lines[0] == lines[1] and "\n" not in lines[0]


def test_inspect_reads_the_build_report_back(built) -> None:
    report = read_build_report(built["onnx"])
    data = json.loads((built["onnx"] / "build-report.json").read_text())
    assert report.onnx is not None and report.memory.equal and report.parity.passed
    assert report.onnx.parity.max_abs_logit_diff == \
        data["onnx"]["parity"]["onnxruntime_vs_torch_runtime_max_abs_logit_diff"]
    assert report.parity.prompt_tokens == data["parity"]["prompt_tokens"]
    assert read_build_report(built["plain"]).onnx is None
    result = CliRunner().invoke(main, ["inspect", str(built["onnx"])])
    assert result.exit_code == 0, result.stderr
    out = " ".join(result.stdout.split())
    diff = data["onnx"]["parity"]["onnxruntime_vs_torch_runtime_max_abs_logit_diff"]
    assert f"onnxruntime vs torch runtime max |dlogit| = {diff:.2e}" in out
    assert f"allocated {data['memory']['allocated_kv_bytes']} B" in out
