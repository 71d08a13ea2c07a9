"""The runtime a team deploys: loads a built artifact without the compiler, in any precision."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kvcompile.build.artifact import MANIFEST, WEIGHTS, build_artifact
from kvcompile.errors import KVCompileError
from kvcompile.runtime import load
from tests.test_profile_io import saved_tiny_model

ROOT = Path(__file__).resolve().parents[1]
COMPILER_MODULES = ("kvcompile.profile.statistics", "kvcompile.fit.pipeline", "kvcompile.fit.greedy",
                    "kvcompile.profile.calibration", "kvcompile.profile.sensitivity", "kvcompile.fit.validation",
                    "kvcompile.textsource", "kvcompile.eval.evaluate", "kvcompile.eval.tasks",
                    "kvcompile.gate.rules", "kvcompile.eval.report", "kvcompile.models", "kvcompile.passes",
                    "kvcompile.build.artifact", "kvcompile.profile.record")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """The same tiny model built twice: float32 and bfloat16 weights."""
    root = tmp_path_factory.mktemp("runtime")
    _, loaded, profile = saved_tiny_model(root)
    out = {}
    for dtype in ("float32", "bfloat16"):
        out[dtype] = root / dtype
        build_artifact(loaded, profile, out[dtype], max_context=96, dtype=dtype, onnx=False)
    return out


def test_runtime_loads_and_serves_without_the_compiler(artifacts) -> None:
    script = (
        "import sys, json\n"
        "import kvcompile.runtime as runtime\n"
        f"engine = runtime.load({str(artifacts['float32'])!r})\n"
        "out = engine.generate([5, 6, 7, 8], max_new_tokens=4)\n"
        # the server a team deploys is part of the runtime: it stands alone too
        "from kvcompile.runtime.scheduler import Scheduler\n"
        "from kvcompile.runtime.server import create_app\n"
        "from kvcompile.runtime.serving import open_pool\n"
        "pool = open_pool(engine, 'torch', slots=1)\n"
        "create_app(Scheduler(pool, engine.tokenizer, engine.eos_token_ids), engine, 'm')\n"
        f"print(json.dumps([len(out.token_ids), [m for m in {COMPILER_MODULES!r} if m in sys.modules]]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    generated, imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert imported == [] and generated > 0


def test_bfloat16_artifact_halves_the_weights_and_serves_in_bfloat16(artifacts) -> None:
    full, half = artifacts["float32"], artifacts["bfloat16"]
    ratio = (half / WEIGHTS).stat().st_size / (full / WEIGHTS).stat().st_size
    assert 0.48 < ratio < 0.52
    manifest = yaml.safe_load((half / MANIFEST).read_text())
    assert manifest["dtype"] == "bfloat16"
    report = json.loads((half / "build-report.json").read_text())
    assert report["parity"]["low_precision"]["greedy_agreement_vs_float32"] >= 0.8
    assert report["memory"]["dtype"] == "bfloat16"
    low, ref = load(half), load(full)
    assert low.model.dtype == torch.bfloat16 and ref.model.dtype == torch.float32
    assert load(half, dtype="float32").model.dtype == torch.float32  # upcast on request
    ids = torch.tensor([[5, 9, 11, 3, 40, 41, 7, 7, 19, 23, 60, 2, 8]])
    logits = {}
    for name, engine, dtype in (("low", low, torch.bfloat16), ("ref", ref, torch.float32)):
        cache = engine.allocate(1, max_context=32)
        steps = [engine.prefill(ids[:, :8], [cache])]
        steps += [engine.extend(ids[:, t:t + 1], cache) for t in range(8, ids.shape[1])]
        logits[name] = torch.stack(steps).float()
        # every key and value buffer, full and budgeted, holds the engine's precision
        buffers = [buf for layer in cache.layers for buf in (layer.full, layer.budgeted) if buf]
        assert {type(buf).__name__ for buf in buffers} == {"FullBuffer", "BudgetedBuffer"}
        assert {t.dtype for buf in buffers for t in (buf.k, buf.v)} == {dtype}, name
    probs = (logits["low"].softmax(-1) - logits["ref"].softmax(-1)).abs().max()
    assert 0 < probs < 0.05


@pytest.mark.parametrize("device,dtype,message", [
    ("cuda", None, "no CUDA GPU"),
    ("tpu", None, "unsupported device"),
    (None, "int8", "unknown dtype"),
])
def test_placement_errors_are_one_line(artifacts, device, dtype, message) -> None:
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(KVCompileError, match=message) as info:
        load(artifacts["float32"], device=device, dtype=dtype)
    assert "\n" not in str(info.value)
