"""Graphs of plans with quantized groups, on tiny models: onnxruntime (function bodies, nothing
registered) against the torch runtime's quantized cache (``runtime/quant_cache.py``).

References: the torch ``Engine`` compiled from the same plan (logits and every state tensor),
``kvcompile.memory.plan_state_bytes`` (the backend's bytes), and the example driver's tokens
against the torch engine's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from kvcompile.build.artifact import build_artifact, compile_engine
from kvcompile.build.onnx_export import export_source
from kvcompile.memory import plan_state_bytes
from kvcompile.passes.onnx import run_static_budget_passes
from kvcompile.plan import BudgetLayout, LayerPlan, Plan, Selection, Storage
from kvcompile.runtime import load, onnx_io
from kvcompile.runtime.quant import Quantized, dequantize_keys, dequantize_values, unpack_codes
from kvcompile.runtime.quant_cache import QuantizedBudgetedBuffer, QuantizedFullBuffer
from tests.tiny import tiny_loaded

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 96
# per layer: (full heads, their storage, budgeted storage, layout); group 5 leaves a body of
# 95 slots and a ring past it, group 3 a last partial key group among the 5 selected slots
VARIANTS = (((0,), Storage(8, 4, 8), Storage(4, 2, 4), BudgetLayout(2, 1, 6, 5)),
            ((1, 3), Storage(2, 2, 5), Storage(), BudgetLayout(1, 0, 3, 4)),
            ((2,), Storage(), Storage(8, 8, 3), BudgetLayout(0, 1, 5, 3)))


def quantized_plan(arch) -> Plan:
    layers = []
    for index, window in enumerate(arch.sliding_windows):
        if window:  # a sliding layer keeps its ring in full precision, whatever its storage
            layers.append(LayerPlan((), tuple(range(arch.n_kv_heads)),
                                    BudgetLayout(0, 0, 0, window - 1), sliding=True,
                                    budget_storage=Storage(8, 8, 4)))
            continue
        full, full_storage, budget_storage, layout = VARIANTS[index % len(VARIANTS)]
        rest = tuple(h for h in range(arch.n_kv_heads) if h not in full)
        layers.append(LayerPlan(full, rest, layout, full_storage=full_storage,
                                budget_storage=budget_storage))
    return Plan(tuple(layers), selection=Selection("attention", observation_window=4))


_MODELS: dict[str, tuple] = {}


def rewritten(family: str):
    """(loaded, plan, prefill, decode): the quantized plan's graphs, made once per family."""
    if family not in _MODELS:
        layers = {"num_hidden_layers": 3} if family == "llama" else {}  # every variant
        loaded = tiny_loaded(family, seed=3, max_position_embeddings=512, **layers)
        plan = quantized_plan(loaded.arch)
        graphs = export_source(loaded.build(), CONTEXT)
        for kind in ("prefill", "decode"):
            run_static_budget_passes(getattr(graphs, kind), kind, plan, loaded.arch, CONTEXT)
        _MODELS[family] = (loaded, plan, graphs.prefill, graphs.decode)
    return _MODELS[family]


def session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                providers=["CPUExecutionProvider"])


def torch_state(cache) -> dict[str, np.ndarray]:
    """Row 0 of a torch cache as the graphs' ``present.*`` tensors."""
    state: dict[str, np.ndarray] = {}

    def put(index: int, part: str, tensor: torch.Tensor) -> None:
        state[onnx_io.present(index, part)] = tensor[0].numpy()

    def put_codes(index: int, group: str, buffer) -> None:
        for name, q in (("key", buffer.keys), ("value", buffer.values)):
            for field in ("codes", "scale", "zero"):
                put(index, f"{group}_{name}_{field}", getattr(q, field))

    for index, layer in enumerate(cache.layers):
        full, kept = layer.full, layer.budgeted
        if isinstance(full, QuantizedFullBuffer):
            put_codes(index, "full", full)
            put(index, "full_key_residual", full.k_res)
            put(index, "full_value_residual", full.v_res)
        elif full is not None:
            put(index, "full_key", full.k)
            put(index, "full_value", full.v)
        if isinstance(kept, QuantizedBudgetedBuffer):
            for part, tensor in zip(onnx_io.BUDGET_PARTS, (kept.fp.k, kept.fp.v, kept.fp.bias,
                                                           kept.fp.counters), strict=True):
                put(index, part, tensor)
            put_codes(index, "budget", kept)
            put(index, "budget_selected_length", kept.selected_length)
        elif kept is not None:
            for part, tensor in zip(onnx_io.BUDGET_PARTS, (kept.k, kept.v, kept.bias,
                                                           kept.counters), strict=True):
                put(index, part, tensor)
    return state


CODE_FLIPS = 0.01  # see assert_state_equal
FP16_NOISE = 1e-3  # see test_quantized_graphs_equal_the_torch_runtime
REAL_NOISE = 1e-2  # see test_a_quantized_smollm2_artifact_equals_the_torch_runtime


def assert_state_equal(found: dict[str, np.ndarray], row: int, cache, plan: Plan,
                       filled: int) -> None:
    """Every state tensor of row ``row`` equals the torch cache's.

    Counters and lengths exactly, bias to 1e-6, full-precision keys and values to
    ``FP16_NOISE`` (after the first quantized layer they carry its float16 scales' noise, see
    the test). Codes and float16 scales are computed bit for bit alike from
    equal inputs (``test_onnx_quant_ops.py``), but onnxruntime's keys and values differ from
    torch's by that float32 noise, so a value within ~1e-6 of a rounding boundary can take
    the neighbouring code or float16 scale: per tensor at most ``CODE_FLIPS`` of the codes
    differ (a packing or layout bug changes most of them), zeros by one float16 ulp plus that
    noise, scales by one ulp plus the zero's ulp over the levels, and every dequantized value
    by at most one quantization step.
    """
    expected = torch_state(cache)
    assert set(expected) == set(found)  # every state tensor of the graph is compared
    for name, want in expected.items():
        got = found[name][row]
        if name.endswith("full_key") or name.endswith("full_value"):
            got, want = got[:, :filled], want[:, :filled]
        message = f"row {row} {name}"
        assert got.dtype == want.dtype, message
        if got.dtype == np.int64:
            np.testing.assert_array_equal(got, want, err_msg=message)
        elif name.endswith("_codes"):
            _, layer, part = name.split(".", 2)
            prefix = name[:-len("_codes")]
            triplets = [[source[f"{prefix}_{f}"] for f in ("codes", "scale", "zero")]
                        for source in ({k: v[row] for k, v in found.items()}, expected)]
            assert_codes_close(*triplets, plan.layers[int(layer)], part, message)
        elif got.dtype == np.float16 and name.endswith("_scale"):
            # scale = (max - zero) / levels with zero = fp16(min): a zero one float16 ulp apart
            # moves the scale by that ulp / levels, on top of the scale's own ulp
            _, layer, part = name.split(".", 2)
            storage = (plan.layers[int(layer)].full_storage if part.startswith("full")
                       else plan.layers[int(layer)].budget_storage)
            levels = 2 ** (storage.key_bits if "_key_" in part else storage.value_bits) - 1
            zero = np.abs(expected[name[:-len("_scale")] + "_zero"]).astype(np.float16)
            bound = (np.spacing(want) + np.spacing(zero) / levels).astype(np.float32) + 1e-5
            diff = np.abs(got.astype(np.float32) - want.astype(np.float32))
            assert (diff <= bound).all(), f"{message}: {diff.max()} over its bound"
        elif got.dtype == np.float16:
            np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32),
                                       rtol=2 ** -10, atol=1e-5, err_msg=message)
        elif name.endswith("budget_bias"):
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0, err_msg=message)
        else:
            np.testing.assert_allclose(got, want, atol=FP16_NOISE, rtol=0, err_msg=message)


def assert_codes_close(got: list[np.ndarray], want: list[np.ndarray], layer: LayerPlan,
                       part: str, message: str) -> None:
    storage = layer.full_storage if part.startswith("full") else layer.budget_storage
    keys = "_key_" in part
    bits = storage.key_bits if keys else storage.value_bits
    # keys: their scales are per channel; values: whole bytes of codes (D = 8 or 16 here)
    head_dim = got[1].shape[-1] if keys else 8 * got[0].shape[-1] // bits
    tensors = [[torch.from_numpy(np.ascontiguousarray(t))[None] for t in triplet]
               for triplet in (got, want)]
    codes = [unpack_codes(t[0], bits, head_dim) for t in tensors]
    differ = (codes[0] != codes[1]).float().mean().item()
    assert differ <= CODE_FLIPS, f"{message}: {differ:.2%} of the codes differ"
    dequantize = dequantize_keys if keys else dequantize_values
    values = [dequantize(Quantized(*t), bits, storage.group, head_dim) for t in tensors]
    step = float(np.abs(want[1].astype(np.float32)).max())  # the largest quantization step
    assert (values[0] - values[1]).abs().max().item() <= step * 1.01 + 1e-5, message


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("prompt,steps", [(30, 40), (5, 20)])
def test_quantized_graphs_equal_the_torch_runtime(family: str, prompt: int, steps: int) -> None:
    """Batch 2, rows of different tokens: after the prefill and every decode step, each row's
    logits and whole state equal its own single-row torch run. The long prompt quantizes body
    groups and selected slots at prefill, then decode flushes the residual ring five times
    and wraps every window (its tokens folded into compensation); the short one leaves the
    body and the selected slots empty.

    Logits within ``FP16_NOISE`` (1e-3), not the 1e-4 of full-precision plans: a key group's
    float32 range that falls within float32 noise (1e-6) of a float16 rounding boundary gets
    a scale one float16 ulp (up to 2^-10 relative) apart, which moves each value of the group
    by up to ~1e-3 of these O(1) activations; measured here: 3e-4. A wrong packing, bit
    width or group moves them by a quantization step (0.1 to 1)."""
    loaded, plan, prefill, decode = rewritten(family)
    _, engine = compile_engine(loaded, plan, max_context=CONTEXT)
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, 90, (2, prompt + steps), generator=generator).numpy()
    caches = [engine.allocate(1, max_context=CONTEXT) for _ in range(2)]
    expected = [engine.prefill(torch.from_numpy(tokens[row:row + 1, :prompt]), [caches[row]])
                for row in range(2)]
    logits, *state = session(prefill).run(None, {onnx_io.INPUT_IDS: tokens[:, :prompt]})
    names = [value.name for value in prefill.graph.outputs[1:]]
    found = dict(zip(names, state, strict=True))
    assert any(name.endswith("_codes") for name in found)
    step = session(decode)
    for t in range(prompt, prompt + steps + 1):
        for row in range(2):
            np.testing.assert_allclose(logits[row], expected[row][0].numpy(), atol=FP16_NOISE,
                                       rtol=0)
            assert_state_equal(found, row, caches[row], plan, t)
        if t == prompt + steps:
            break
        expected = [engine.extend(torch.from_numpy(tokens[row:row + 1, t:t + 1]), caches[row])
                    for row in range(2)]
        feed = {onnx_io.INPUT_IDS: tokens[:, t:t + 1],
                onnx_io.PAST_LENGTH: np.full(2, t, dtype=np.int64),
                **{name.replace("present.", "past.", 1): value for name, value in found.items()}}
        logits, *state = step.run(None, feed)
        found = dict(zip(names, state, strict=True))
    if prompt == 30:  # what the case claims to reach, in the torch cache both matched
        for layer in caches[0].layers:
            if isinstance(layer.full, QuantizedFullBuffer):  # a group flushed while decoding
                group = layer.full.storage.group
                assert (prompt + steps) // group - 1 > prompt // group
                assert layer.full.keys.scale[0, :, (prompt + steps) // group - 1].any()
            kept = layer.budgeted
            if isinstance(kept, QuantizedBudgetedBuffer):
                assert kept.selected_length[0] == kept.layout.selected
                kept = kept.fp
            assert kept.counters[0, 1] > kept.layout.window  # the ring wrapped


def test_validation_ties_the_quantized_graph_to_its_storage() -> None:
    """The last pass accepts the graphs it was run on and refuses them for a plan whose
    storage differs (other bits: other code shapes; full precision: other tensors)."""
    from dataclasses import replace

    from kvcompile.passes.onnx import StaticBudgetGraphError, ValidateStaticBudgetGraph

    loaded, plan, prefill, decode = rewritten("llama")
    arch = loaded.arch
    for kind, graph in (("prefill", prefill), ("decode", decode)):
        assert not ValidateStaticBudgetGraph(plan, arch, CONTEXT, kind)(graph).modified
        first = plan.layers[0]
        for other in (replace(first, full_storage=Storage(4, 4, 8)),
                      replace(first, budget_storage=Storage())):
            wrong = replace(plan, layers=(other, *plan.layers[1:]))
            with pytest.raises(StaticBudgetGraphError):
                ValidateStaticBudgetGraph(wrong, arch, CONTEXT, kind)(graph)


# ------------------------------------------------------------------ a quantized artifact


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A tiny qwen2 artifact (``kvcompile build``'s code path, its ONNX parity check included)
    whose profile plan stores its groups quantized: layer 0 every group, layer 1 its full heads.
    The build's checks all hold (its within-capacity check serves the plan at full precision)."""
    from dataclasses import replace

    from tests.test_profile_io import saved_tiny_model

    root = tmp_path_factory.mktemp("onnx-quant")
    _, loaded, profile = saved_tiny_model(root)
    storages = ((Storage(8, 4, 8), Storage(4, 4, 2)), (Storage(4, 2, 5), Storage()))
    heads = loaded.arch.n_kv_heads  # both groups in every layer, whatever the tiny fit chose
    layers = tuple(LayerPlan((0,), tuple(range(1, heads)), BudgetLayout(4, 1, 12, 16),
                             full_storage=full, budget_storage=budget) for full, budget in storages)
    assert layers[0].quantized_full and layers[0].quantized_selected and layers[1].quantized_full
    report = build_artifact(loaded, replace(profile, plan=replace(profile.plan, layers=layers)),
                            root / "artifact", max_context=CONTEXT)
    assert report.onnx is not None and report.onnx.parity.passed  # onnxruntime vs torch, 1e-3
    return root / "artifact"


PROMPTS = ([5, 9, 11, 3, 40, 41, 7, 7, 19, 23, 60, 12, 8, 30, 31, 32, 33, 70, 71, 72], [5, 9, 11])


def test_onnx_backend_serves_a_quantized_artifact(artifact: Path) -> None:
    """The torch engine's greedy tokens past every capacity, and the KV bytes of the one
    definition (``plan_state_bytes``: codes, scales, rings, bias, counters, lengths)."""
    torch_engine, onnx_engine = load(artifact), load(artifact, backend="onnx")
    plan = onnx_engine.plan
    assert plan.quantized and plan == torch_engine.plan
    for prompt in PROMPTS:
        expected = torch_engine.generate(prompt, max_new_tokens=40)
        found = onnx_engine.generate(prompt, max_new_tokens=40)
        assert found.token_ids == expected.token_ids and len(found.token_ids) > 20
    head_dim = torch_engine.model.arch.head_dim
    cache = onnx_engine.allocate(2)
    assert cache.nbytes == 2 * plan_state_bytes(plan, head_dim, CONTEXT, 4)
    assert cache.nbytes == torch_engine.allocate(2, CONTEXT).nbytes
    dtypes = {spec.dtype for spec in onnx_engine.cache_specs}
    assert dtypes == {"float32", "float16", "uint8", "int64"}


def test_the_slot_pool_serves_quantized_rows_as_each_alone(artifact: Path) -> None:
    """Two rows prefilled apart and decoded together: each row's logits equal its own
    single-row run of the backend, and a row's bytes are the plan's. Batched matmuls round
    apart (1e-6), which a float16 scale can magnify to ``FP16_NOISE``; its greedy tokens
    (fed to both) are the pool's."""
    from kvcompile.runtime.onnx_pool import OnnxSlotPool, onnx_bytes_per_slot

    engine = load(artifact, backend="onnx")
    pool = OnnxSlotPool(engine, 2)
    head_dim = next(spec.shape[3] for spec in engine.cache_specs if spec.part == "budget_key")
    assert onnx_bytes_per_slot(engine) == plan_state_bytes(engine.plan, head_dim, CONTEXT, 4)
    alone = [engine.allocate(1) for _ in PROMPTS]
    logits = [pool.finish(pool.begin(prompt)) for prompt in PROMPTS]
    singles = [engine.prefill(np.array([prompt]), [cache]) for prompt, cache in zip(PROMPTS, alone, strict=True)]
    for row in range(2):
        np.testing.assert_array_equal(logits[row], singles[row][0])
    for step in range(30):  # past the longest capacity and several flushes
        tokens = [int(np.argmax(row)) for row in logits]
        logits = pool.decode(tokens)
        for row, cache in enumerate(alone):
            single = engine.decode_step(np.array([[tokens[row]]]), cache)[0]
            np.testing.assert_allclose(logits[row], single, atol=FP16_NOISE, rtol=0,
                                       err_msg=f"step {step} row {row}")


def test_the_example_script_runs_a_quantized_artifact(artifact: Path, tmp_path: Path) -> None:
    """onnxruntime + numpy + tokenizers only (no torch, no kvcompile), the torch engine's
    greedy tokens. The copy it runs carries the tiny model's own word-level tokenizer
    (``w5`` -> 5; the artifact's converted one encodes these words to nothing), so the torch
    engine is given the same ids."""
    import shutil

    from tests.tiny import save_tokenizer

    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    save_tokenizer(tmp_path / "tokenizer")
    shutil.copy(tmp_path / "tokenizer" / "tokenizer.json", copy / "tokenizer.json")
    prompt = PROMPTS[0][:12]
    script = (
        "import json, runpy, sys\n"
        f"sys.argv = ['ort_generate.py', {str(copy)!r}, '--prompt', "
        f"{' '.join(f'w{i}' for i in prompt)!r}, '--max-new-tokens', '30', '--ids']\n"
        "runpy.run_path('examples/ort_generate.py', run_name='__main__')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'kvcompile', 'transformers'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    ids_line, modules_line = done.stdout.strip().splitlines()[-2:]
    assert json.loads(modules_line) == []
    expected = load(artifact).generate(prompt, max_new_tokens=30)
    assert json.loads(ids_line) == expected.token_ids and len(expected.token_ids) > 10


# ------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_a_quantized_smollm2_artifact_equals_the_torch_runtime(smollm2, tmp_path_factory) -> None:
    """The shipped SmolLM2 profile with its groups stored as codes (even layers: full heads
    k8v4 and selected slots k4v2; odd layers: full heads k4v4), built as an artifact: a real
    prompt past every capacity, then 40 greedy decode steps (a residual flush in every full
    group, every window wrapped). State after prefill as on the tiny models; logits within
    ``REAL_NOISE`` (1e-2): this model's logits are O(10), ten times the tiny models', so the
    float16-scale noise bound of 1e-3 scales with them; measured: 1.1e-3 (the full-precision
    plan's 30 layers alone give 1e-4)."""
    from dataclasses import replace

    from kvcompile.build.artifact import load_engine
    from kvcompile.profile.record import load_profile
    from kvcompile.textsource import encode_text, evaluation_paragraphs

    steps = 40
    profile = load_profile(ROOT / "profiles" / "smollm2-135m-instruct.yaml")
    capacity = max(layer.layout.capacity for layer in profile.plan.layers if layer.layout)
    context = max(1536, capacity + 40 + steps)  # the prompt past every capacity, then the steps
    storages = ((Storage(8, 4, 32), Storage(4, 2, 32)), (Storage(4, 4, 32), Storage()))
    layers = tuple(replace(layer, full_storage=storages[i % 2][0], budget_storage=storages[i % 2][1])
                   for i, layer in enumerate(profile.plan.layers))
    plan = replace(profile.plan, layers=layers)
    out = tmp_path_factory.mktemp("onnx-quant-smollm2") / "artifact"
    build_artifact(smollm2, replace(profile, plan=plan), out, max_context=context)
    engine, onnx_engine = load_engine(out), load(out, backend="onnx")
    assert onnx_engine.plan.quantized
    ids = encode_text(smollm2.tokenizer, "\n".join(evaluation_paragraphs()[:60]))[:capacity + 40]
    assert len(ids) == capacity + 40
    cache, onnx_cache = engine.allocate(1, context), onnx_engine.allocate(1)
    expected = engine.prefill(torch.tensor([ids]), [cache])
    found = onnx_engine.prefill(np.array([ids]), [onnx_cache])
    worst = [float(np.abs(found - expected.numpy()).max())]
    state = {spec.output_name: value.numpy() for spec, value in onnx_cache.values.items()}
    assert_state_equal(state, 0, cache, onnx_engine.plan, len(ids))
    for _ in range(steps):  # both fed the torch runtime's greedy tokens
        token = expected.argmax(-1, keepdim=True)
        expected = engine.extend(token, cache)
        found = onnx_engine.decode_step(token.numpy(), onnx_cache)
        worst.append(float(np.abs(found - expected.numpy()).max()))
    assert max(worst) < REAL_NOISE, worst
    assert onnx_cache.nbytes == plan_state_bytes(onnx_engine.plan, 64, context, 4)
