"""End-to-end on the real model: profile -> build -> run/inspect, and every bad input.

One small profile and one artifact are built per module (the real model loads once per
session); tamper tests change a file in place and restore it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from kvcompile.build.artifact import MANIFEST, WEIGHTS, load_engine
from kvcompile.cli import main
from kvcompile.fit.pipeline import run_profile
from kvcompile.profile.calibration import CalibConfig
from kvcompile.profile.record import load_profile, save_profile
from kvcompile.settings import FitSettings

pytestmark = pytest.mark.slow

SMALL_CALIB = CalibConfig(n_text=1, text_length=256, n_passkey=1, n_multikey=1, probe_length=256,
                          repeat_block=64, repeat_times=3)


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    """The failure must be exactly one line on stderr and a non-zero exit."""
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def profile_path(smollm2, workdir) -> Path:
    profile = run_profile(smollm2, SMALL_CALIB, FitSettings(kv_budget=0.25, at_context=1024))
    path = workdir / "profile.yaml"
    save_profile(profile, path)
    return path


@pytest.fixture(scope="module")
def artifact(profile_path, workdir) -> Path:
    out = workdir / "artifact"
    result = invoke("build", "default", "--profile", profile_path, "-o", out, "--max-context", 1024,
                    "--no-onnx")  # the ONNX graphs have their own module (test_onnx_artifact)
    assert result.exit_code == 0, result.output + result.stderr
    return out


def test_build_writes_a_verified_artifact(artifact: Path, profile_path: Path) -> None:
    manifest = yaml.safe_load((artifact / MANIFEST).read_text())
    assert manifest["format"] == "kvcompile-artifact/1"
    assert set(manifest["files"]) >= {WEIGHTS, "config.json", "profile.yaml", "build-report.json",
                                      "tokenizer.json", "generation_config.json"}
    report = json.loads((artifact / "build-report.json").read_text())
    assert report["parity"]["passed"]
    assert report["memory"]["allocated_kv_bytes"] == report["memory"]["predicted_kv_bytes"]
    assert manifest["source_model"]["fingerprint"] == load_profile(profile_path).fingerprint
    assert manifest["onnx"] is None and not (artifact / "onnx").exists()  # --no-onnx
    # no temporary directories left beside it
    assert not [p for p in artifact.parent.iterdir() if p.name.startswith(".artifact")]


def test_runtime_equals_uncompressed_transformers_within_capacity(artifact: Path, smollm2) -> None:
    """Prompt + generated tokens fit every budgeted head: logits equal transformers' (1e-4)."""
    from transformers import AutoModelForCausalLM

    engine = load_engine(artifact)
    smallest = min(layer.layout.token_slots for layer in engine.plan.layers if layer.layout)
    ids = engine.encode("Static budgets: the sinks, the window and the compensation token.")
    steps = 6
    ids = ids[: smallest - steps]
    assert len(ids) > 8
    cache = engine.allocate(1, max_context=len(ids) + steps)
    logits = [engine.prefill(torch.tensor([ids]), [cache])[0]]
    tokens = list(ids)
    for _ in range(steps):
        token = int(logits[-1].argmax())
        tokens.append(token)
        logits.append(engine.extend(torch.tensor([[token]]), cache)[0])
    hf = AutoModelForCausalLM.from_config(smollm2.config)
    hf.load_state_dict({**smollm2.state, "lm_head.weight": smollm2.state["model.embed_tokens.weight"]},
                       strict=False)
    hf.eval()
    with torch.no_grad():
        reference = hf(torch.tensor([tokens])).logits[0, len(ids) - 1:]
    assert torch.allclose(torch.stack(logits), reference, atol=1e-4, rtol=0)


def test_run_streams_greedy_text_matching_the_engine(artifact: Path) -> None:
    result = invoke("run", artifact, "--prompt", "The capital of France is", "--max-new-tokens", 8)
    assert result.exit_code == 0, result.stderr
    expected = load_engine(artifact).generate("The capital of France is", max_new_tokens=8).text
    assert result.stdout.strip() == expected.strip()
    assert "generated" in result.stderr


def test_sampling_is_seeded(artifact: Path) -> None:
    engine = load_engine(artifact)
    a = engine.generate("Once upon a time", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3)
    b = engine.generate("Once upon a time", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3)
    c = engine.generate("Once upon a time", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=4)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_inspect_prints_plan_and_equal_memory(artifact: Path) -> None:
    result = invoke("inspect", artifact)
    assert result.exit_code == 0, result.stderr
    engine = load_engine(artifact)
    allocated = engine.allocate(1).nbytes  # the float32 runtime's own buffers
    assert f"{allocated} B (plan predicts {allocated} B)" in " ".join(result.stdout.split())
    assert "per-layer plan" in result.stdout and "bits/value" in result.stdout


@pytest.mark.parametrize("victim", [WEIGHTS, "config.json", "profile.yaml"])
def test_tampered_file_is_refused(artifact: Path, victim: str) -> None:
    path = artifact / victim
    original = path.read_bytes()
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0x01
    try:
        path.write_bytes(bytes(changed))
        line = one_line_error(invoke("inspect", artifact))
        assert victim in line and "sha256" in line
    finally:
        path.write_bytes(original)
    assert invoke("inspect", artifact).exit_code == 0


def test_missing_file_is_refused(artifact: Path) -> None:
    path = artifact / "config.json"
    hidden = artifact.parent / "config.json.away"
    shutil.move(path, hidden)
    try:
        line = one_line_error(invoke("run", artifact, "--prompt", "hi"))
        assert "config.json" in line and "missing" in line
    finally:
        shutil.move(hidden, path)


def test_wrong_format_version_is_refused(artifact: Path) -> None:
    path = artifact / MANIFEST
    original = path.read_text()
    try:
        path.write_text(original.replace("kvcompile-artifact/1", "kvcompile-artifact/9"))
        line = one_line_error(invoke("inspect", artifact))
        assert "kvcompile-artifact/9" in line
    finally:
        path.write_text(original)


def test_not_an_artifact(tmp_path: Path) -> None:
    assert "does not exist" in one_line_error(invoke("inspect", tmp_path / "nope"))
    assert MANIFEST in one_line_error(invoke("inspect", tmp_path))


def test_unknown_profile_schema_writes_nothing(profile_path: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(profile_path.read_text().replace("kvcompile-profile/1", "kvcompile-profile/7"))
    out = tmp_path / "out"
    line = one_line_error(invoke("build", "default", "--profile", bad, "-o", out))
    assert "format" in line
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_profile_for_another_model_is_refused(profile_path: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(profile_path.read_text())
    data["model"]["fingerprint"] = "sha256:" + "0" * 64
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    line = one_line_error(invoke("build", "default", "--profile", other, "-o", out))
    assert "profile was made for model" in line
    assert not out.exists()


def test_interrupted_build_leaves_nothing(profile_path: Path, tmp_path: Path, monkeypatch) -> None:
    import kvcompile.build.artifact as artifact_module
    from kvcompile.models import load_model

    def explode(tmp, *args, **kwargs):
        (tmp / "partial.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact_module, "_write_files", explode)
    out = tmp_path / "art"
    with pytest.raises(KeyboardInterrupt):
        artifact_module.build_artifact(load_model("default"), load_profile(profile_path), out)
    assert list(tmp_path.iterdir()) == []


def test_prompt_longer_than_context(artifact: Path) -> None:
    line = one_line_error(invoke("run", artifact, "--prompt", "word " * 1100, "--max-new-tokens", 4))
    assert "context" in line
    result = invoke("run", artifact, "--prompt", "word " * 1100, "--max-new-tokens", 4)
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["profile", "/no/such/model"], "not found"),
        (["profile", "default", "--kv-budget", "0"], "--kv-budget"),
        (["profile", "default", "--kv-budget", "1.5"], "--kv-budget"),
        (["profile", "default", "--equal-weight", "2"], "--equal-weight"),
        (["profile", "default", "--answer-weight", "-1"], "--answer-weight"),
        (["profile", "default", "--observation-window", "0"], "--observation-window"),
        (["profile", "default", "--budget-storage", "k2v4"], "--budget-storage: keys need at least as many bits"),
        (["profile", "default", "--full-storage", "int4"], "--full-storage: storage must be 'full' or like"),
        (["profile", "default", "--at-context", "100000"], "maximum context"),
        (["profile", "default", "--calib", "/no/such/file.txt"], "does not exist"),
    ],
)
def test_profile_bad_inputs(args: list[str], expected: str, tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    result = invoke(*args, "-o", out)
    assert expected in one_line_error(result)
    assert result.exit_code == 2
    assert not out.exists()


def test_profile_bad_files(tmp_path: Path) -> None:
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    not_gguf = tmp_path / "random.gguf"
    not_gguf.write_bytes(bytes(range(256)))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    for args in (["profile", corrupt], ["profile", not_gguf], ["profile", "default", "--calib", empty],
                 ["profile", "default", "--calib", binary]):
        result = invoke(*args, "-o", tmp_path / "p.yaml")
        one_line_error(result)
        assert result.exit_code == 2
    assert not (tmp_path / "p.yaml").exists()


def test_profile_cli_small_run_is_deterministic(tmp_path: Path) -> None:
    # storages set: the measured choice serves the quantized variants alone, a quarter of the
    # candidates of the default (tests/test_profile_io.py runs that, twice)
    args = ["profile", "default", "--calib-length", 192, "--calib-prompts", 1, "--kv-budget", 0.25,
            "--at-context", 1024, "--full-storage", "k8v4g32", "--budget-storage", "k8v4g32", "--plot"]
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    result = invoke(*args, "-o", first)
    assert result.exit_code == 0, result.stderr
    assert invoke(*args, "-o", second).exit_code == 0
    assert first.read_bytes() == second.read_bytes()
    for suffix in ("retrieval", "error", "capacity"):
        assert (tmp_path / f"a-{suffix}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    profile = load_profile(first)
    # the budget in bytes against the bf16 cache (the plan may hold more slots in codes)
    from kvcompile.arch import arch_from_description
    from kvcompile.memory import plan_bytes, uncompressed_bytes

    arch = arch_from_description(profile.model["architecture"])
    assert plan_bytes(profile.plan, arch, 1024) <= 0.25 * uncompressed_bytes(arch, 1024)
    assert "memory at 1024 tokens" in result.stdout
    assert (profile.settings.full_storage.name, profile.settings.budget_storage.name) == ("k8v4g32",) * 2


def test_manifest_naming_another_source_model_is_refused(artifact: Path) -> None:
    path = artifact / MANIFEST
    original = path.read_text()
    data = yaml.safe_load(original)
    data["source_model"]["fingerprint"] = "sha256:" + "f" * 64
    try:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        assert "source fingerprint" in one_line_error(invoke("inspect", artifact))
    finally:
        path.write_text(original)
