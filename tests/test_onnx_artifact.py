"""The ONNX graphs of a real SmolLM2 artifact (the shipped profile), end to end.

One artifact with its ONNX graphs is built per module (``kvcompile build``; the real model
loads once per session). References: the torch runtime loaded from the same artifact
(logits, compressed cache state, greedy tokens, ``kvcompile run``'s output).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
import yaml
from click.testing import CliRunner

from kvcompile.build.artifact import MANIFEST, load_engine, sha256_file
from kvcompile.cli import main
from kvcompile.profile.record import load_profile
from kvcompile.runtime import load, onnx_io
from kvcompile.textsource import encode_text, evaluation_paragraphs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "profiles" / "smollm2-135m-instruct.yaml"
CONTEXT = 1536
STEPS = 64
PROMPT = "The capital of France is"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def artifact(smollm2, tmp_path_factory) -> Path:
    """The shipped profile's plan at full precision (``kvcompile fit --full-storage full
    --budget-storage full``, its recorded settings otherwise): these tests read full-precision
    cache tensors; tests/test_onnx_quant.py covers a quantized SmolLM2 artifact. The profile
    is kept beside the artifact (``profile.yaml``)."""
    out = tmp_path_factory.mktemp("onnx-artifact") / "artifact"
    profile = out.parent / "profile.yaml"
    refit = invoke("fit", SHIPPED, "--kv-budget", load_profile(SHIPPED).settings.kv_budget,
                   "--full-storage", "full", "--budget-storage", "full", "-o", profile)
    assert refit.exit_code == 0, refit.output + refit.stderr
    assert not load_profile(profile).plan.quantized
    result = invoke("build", "default", "--profile", profile, "-o", out, "--max-context", CONTEXT)
    assert result.exit_code == 0, result.output + result.stderr
    assert "onnxruntime vs torch runtime" in result.stdout
    return out


@pytest.fixture(scope="module")
def engines(artifact) -> tuple:
    """The artifact's torch engine and its onnxruntime engine, loaded once."""
    return load_engine(artifact), load(artifact, backend="onnx")


@pytest.fixture(scope="module")
def long_prompt(smollm2, artifact) -> list[int]:
    """Real text longer than every budgeted head's capacity."""
    capacity = max(layer.layout.capacity for layer in load_profile(artifact.parent / "profile.yaml").plan.layers
                   if layer.layout)
    ids = encode_text(smollm2.tokenizer, "\n".join(evaluation_paragraphs()[:60]))
    assert len(ids) > capacity + 100
    return ids[:capacity + 100]


def test_onnxruntime_equals_the_torch_runtime_past_every_capacity(engines, long_prompt) -> None:
    """Function bodies, nothing registered, fp32: the compressed state after prefill equals the
    torch runtime's (same slots filled, counters and bias exact; keys and values within the
    float32 noise 30 layers accumulate, 1e-4: another selected token would differ by ~1), and
    the logits stay within 1e-4 for 64 decode steps past it."""
    engine, onnx_engine = engines
    length = len(long_prompt)
    ids = torch.tensor([long_prompt])
    cache, onnx_cache = engine.allocate(1, CONTEXT), onnx_engine.allocate(1)
    expected = engine.prefill(ids, [cache])
    found = onnx_engine.prefill(ids.numpy(), [onnx_cache])
    np.testing.assert_allclose(found, expected.numpy(), atol=1e-4, rtol=0)
    state = {spec.output_name: value.numpy() for spec, value in onnx_cache.values.items()}
    for index, layer in enumerate(cache.layers):
        if layer.full is not None:
            for part, buffer in (("full_key", layer.full.k), ("full_value", layer.full.v)):
                np.testing.assert_allclose(state[onnx_io.present(index, part)][:, :, :length],
                                           buffer[:, :, :length].numpy(), atol=1e-4, rtol=0)
        kept = layer.budgeted
        assert kept is not None and kept.counters[0, 3] > 0  # every layer folded tokens
        for part, buffer in (("budget_key", kept.k), ("budget_value", kept.v)):
            np.testing.assert_allclose(state[onnx_io.present(index, part)], buffer.numpy(),
                                       atol=1e-4, rtol=0)
        np.testing.assert_allclose(state[onnx_io.present(index, "budget_bias")],
                                   kept.bias.numpy(), atol=1e-6, rtol=0)
        np.testing.assert_array_equal(state[onnx_io.present(index, "budget_counters")],
                                      kept.counters.numpy())
    worst = 0.0
    for _ in range(STEPS):  # both fed the torch runtime's greedy tokens
        token = expected.argmax(-1, keepdim=True)
        expected = engine.extend(token, cache)
        found = onnx_engine.decode_step(token.numpy(), onnx_cache)
        worst = max(worst, float(np.abs(found - expected.numpy()).max()))
    assert worst < 1e-4
    assert onnx_cache.length == length + STEPS == cache.length


def test_the_example_script_reproduces_kvcompile_run(artifact, engines) -> None:
    """onnxruntime + numpy + tokenizers only: the tokens of `kvcompile run` (torch runtime), and
    `kvcompile run --backend onnx` prints the same text."""
    script = (
        "import json, runpy, sys\n"
        f"sys.argv = ['ort_generate.py', {str(artifact)!r}, '--prompt', {PROMPT!r}, "
        "'--max-new-tokens', '24', '--ids']\n"
        "runpy.run_path('examples/ort_generate.py', run_name='__main__')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'kvcompile', 'transformers'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    ids_line, modules_line = done.stdout.strip().splitlines()[-2:]
    assert json.loads(modules_line) == []
    expected = engines[0].generate(PROMPT, max_new_tokens=24)  # what `kvcompile run` runs
    assert json.loads(ids_line) == expected.token_ids and len(expected.token_ids) == 24
    run = invoke("run", artifact, "--prompt", PROMPT, "--max-new-tokens", 24, "--backend", "onnx")
    assert run.exit_code == 0, run.stderr
    assert run.stdout.strip() == expected.text.strip()


def test_eval_runs_the_artifact_in_onnxruntime_beside_the_torch_baseline(artifact,
                                                                          tmp_path: Path) -> None:
    result = invoke("eval", artifact, "--tasks", "passkey", "--lengths", "256", "--samples", 2,
                    "--backend", "onnx", "-o", tmp_path / "report")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["artifact"]["backend"] == "onnx"
    row = report["tasks"][0]
    assert row["n"] == 2 and {"baseline", "artifact"} <= set(row)


def _by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    return {value.name: value for value in [*graph.inputs, *graph.outputs]}


def test_the_rewritten_graphs_are_the_static_budget_form(artifact) -> None:
    """Walk both graphs: each layer's cache is written by the prescribed node and attended by
    kvcompile nodes, no standard Attention or cache Concat is left, every cache tensor is
    static, and every kvcompile node has a body in standard ops."""
    plan = load_profile(artifact.parent / "profile.yaml").plan
    specs = onnx_io.cache_tensors(plan, CONTEXT, 64)
    weights = (artifact / onnx_io.ONNX_DIR / onnx_io.WEIGHTS_FILE).stat().st_size
    rope = 2 * CONTEXT * 64 * 4  # one cos and one sin table
    assert weights <= (artifact / "model.safetensors").stat().st_size + rope + (1 << 20)
    for kind in ("prefill", "decode"):
        model = ir.load(artifact / onnx_io.ONNX_DIR / f"{kind}.onnx")
        graph, values = model.graph, _by_name(model.graph)
        assert dict(model.opset_imports) == {"": 24, "kvcompile": 1}
        for node in graph:
            assert (node.domain, node.op_type) != ("", "Attention")
            if node.op_type == "Concat":
                assert not any(v is not None and v.name.startswith(("past.", "present."))
                               for v in node.inputs)
            if node.domain == "kvcompile":
                function = model.functions[node.domain, node.op_type, node.overload]
                assert dict(function.opset_imports) == {"": 24}
                assert all(inner.domain == "" for inner in function)
        for spec in specs:
            names = [spec.output_name] + ([spec.input_name] if kind == "decode" else [])
            for name in names:
                dims = list(values[name].shape)
                assert str(dims[0]) == onnx_io.BATCH and dims[1:] == list(spec.shape[1:])
        attentions = 0
        for index, layer in enumerate(plan.layers):
            writes = {part: values[onnx_io.present(index, part)].producer()
                      for part in ("full_key", "budget_key") if onnx_io.present(index, part) in values}
            if kind == "prefill":
                assert {p: n.op_type for p, n in writes.items()} == {
                    **({"full_key": "Pad"} if layer.full_heads else {}),
                    "budget_key": "CompressPrefill"}
                assert writes["budget_key"].attributes["window"].value == layer.layout.window
                continue
            if layer.full_heads:
                write = writes["full_key"]
                assert write.op_type == "TensorScatter"
                assert write.inputs[0] is values[onnx_io.past(index, "full_key")]
                readers = [use.node for use in write.outputs[0].uses()]
                assert [(n.op_type, n.overload) for n in readers] == [("BudgetedAttention",
                                                                      "length")]
                attentions += 1
            update = writes["budget_key"]
            assert update.op_type == "BudgetedCacheUpdate"
            assert [v.name for v in update.inputs[:4]] == [
                onnx_io.past(index, part) for part in onnx_io.BUDGET_PARTS]
            assert (update.attributes["selected"].value, update.attributes["window"].value) == (
                layer.layout.selected, layer.layout.window)
            readers = {(use.node.op_type, use.node.overload) for use in
                       update.outputs[0].uses()}
            assert readers == {("BudgetedAttention", "bias")}
            attentions += 1
        if kind == "decode":
            assert attentions == sum(node.op_type == "BudgetedAttention" for node in graph)


@pytest.mark.parametrize("victim,damage", [
    (onnx_io.DECODE_FILE, "flip"), (onnx_io.WEIGHTS_FILE, "flip"),
    (onnx_io.PREFILL_FILE, "truncate"), (onnx_io.WEIGHTS_FILE, "truncate"),
])
def test_a_damaged_onnx_file_is_refused(artifact, victim: str, damage: str) -> None:
    path = artifact / onnx_io.ONNX_DIR / victim
    expected = yaml.safe_load((artifact / MANIFEST).read_text())["files"][
        f"{onnx_io.ONNX_DIR}/{victim}"]
    size = path.stat().st_size
    with open(path, "r+b") as handle:  # damage in place, keeping what it takes to undo it
        handle.seek(size // 2 if damage == "flip" else size - 4096)
        kept = handle.read(1 if damage == "flip" else 4096)
        if damage == "flip":
            handle.seek(size // 2)
            handle.write(bytes([kept[0] ^ 0x01]))
        else:
            handle.truncate(size - 4096)
    try:
        result = invoke("run", artifact, "--prompt", PROMPT, "--backend", "onnx")
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, result.stderr
        assert victim in lines[0] and "sha256" in lines[0]
    finally:
        with open(path, "r+b") as handle:
            handle.seek(size // 2 if damage == "flip" else size - 4096)
            handle.write(kept)
    assert sha256_file(path) == expected
