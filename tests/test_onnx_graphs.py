"""The ONNX export and graph passes on tiny models (no SmolLM2 here).

References: the torch model (``compact_logits``) for the exported source graphs, the torch
ops and cache (``runtime/ops.py``, ``runtime/cache.py``) for the function bodies, the torch
``compile_model`` for the initializer permutation, and the torch runtime (``Engine``) for
the rewritten graphs run by onnxruntime with nothing registered.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from kvcompile.build.artifact import compile_engine
from kvcompile.build.onnx_export import export_source
from kvcompile.passes import compile_model
from kvcompile.passes.onnx import (
    AttachFunctionBodies,
    PassFailed,
    PermuteKVHeads,
    RewriteDecode,
    RewritePrefillAttention,
    RewritePrefillCache,
    StaticBudgetGraphError,
    ValidateStaticBudgetGraph,
    run_static_budget_passes,
    static_budget_passes,
)
from kvcompile.passes.onnx.functions import function_for
from kvcompile.plan import BudgetLayout, LayerPlan, Plan, Selection
from kvcompile.runtime import onnx_io
from kvcompile.runtime.cache import BudgetedBuffer, compress_prefill, selection_scores
from kvcompile.runtime.ops import budgeted_attention, budgeted_cache_update, log_count
from tests.tiny import compact_logits, tiny_loaded

FAMILIES = ("llama", "qwen2", "mistral", "gemma3_text")
CONTEXT = 96  # slots of the graphs' full-head buffers
LAYOUTS = (BudgetLayout(2, 1, 3, 8), BudgetLayout(1, 0, 2, 5))


def tiny_plan(arch, selection: str = "attention") -> Plan:
    """Full heads mixed per layer (none, one, two), a compensation-less layout, and sliding
    layers kept as a ring one slot shorter than the model's window (the fit may shrink them)."""
    layers = []
    for index, window in enumerate(arch.sliding_windows):
        if window:
            layers.append(LayerPlan((), tuple(range(arch.n_kv_heads)),
                                    BudgetLayout(0, 0, 0, window - 1), sliding=True))
        else:
            full = ((2,), (1, 3))[index % 2] if index % 3 else ()
            rest = tuple(h for h in range(arch.n_kv_heads) if h not in full)
            layers.append(LayerPlan(full, rest, LAYOUTS[index % 2]))
    return Plan(tuple(layers), selection=Selection(selection, observation_window=4))


_SOURCES: dict[str, tuple] = {}


def source(family: str):
    """(loaded, exported source graphs), exported once per family and cloned for each use."""
    if family not in _SOURCES:
        loaded = tiny_loaded(family, seed=3, max_position_embeddings=512)
        _SOURCES[family] = (loaded, export_source(loaded.build(), CONTEXT))
    loaded, graphs = _SOURCES[family]
    return loaded, graphs.prefill.clone(), graphs.decode.clone()


def session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                providers=["CPUExecutionProvider"])


def ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 90, (batch, length), generator=generator).numpy()


def op_counts(model: ir.Model) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for node in model.graph:
        counts[node.domain, node.op_type] = counts.get((node.domain, node.op_type), 0) + 1
    return counts


# ------------------------------------------------------------------ the exported source graphs


@pytest.mark.parametrize("family", FAMILIES)
def test_source_graphs_equal_the_torch_model(family: str) -> None:
    """Before any pass: standard ops, one Attention per layer, equal to the torch model."""
    loaded, prefill, decode = source(family)
    n_layers = loaded.arch.n_layers
    for graph in (prefill, decode):
        assert {domain for domain, _ in op_counts(graph)} == {""}
        assert op_counts(graph)["", "Attention"] == n_layers
    assert op_counts(decode)["", "TensorScatter"] == 2 * n_layers
    tables = [name for name in decode.graph.initializers if name.startswith("rope_")]
    assert len(tables) == (4 if family == "gemma3_text" else 2)  # one cos/sin pair per RoPE
    tokens = ids(2, 24)
    reference = compact_logits(loaded.build(), torch.from_numpy(tokens)).numpy()
    prompt = 10
    logits, *cache = session(prefill).run(None, {onnx_io.INPUT_IDS: tokens[:, :prompt]})
    np.testing.assert_allclose(logits, reference[:, prompt - 1], atol=2e-5, rtol=0)
    assert cache[0].shape == (2, loaded.arch.n_kv_heads, CONTEXT, loaded.arch.head_dim)
    step = session(decode)
    names = [value.name for value in decode.graph.inputs[2:]]
    for t in range(prompt, tokens.shape[1]):
        feed = {onnx_io.INPUT_IDS: tokens[:, t:t + 1],
                onnx_io.PAST_LENGTH: np.full(2, t, dtype=np.int64),
                **dict(zip(names, cache, strict=True))}
        logits, *cache = step.run(None, feed)
        np.testing.assert_allclose(logits, reference[:, t], atol=2e-5, rtol=0)


# ------------------------------------------------------------------ each pass alone


def test_permute_pass_moves_the_heads_the_torch_pass_moves() -> None:
    loaded, _, decode = source("qwen2")  # qwen2: q/k/v biases move too
    arch = loaded.arch
    plan = tiny_plan(arch)
    result = PermuteKVHeads(plan, arch)(decode)
    assert result.modified
    expected = compile_model(arch, loaded.config, loaded.state, plan).state
    for name in (f"model.layers.{i}.self_attn.{proj}.{kind}" for i in range(arch.n_layers)
                 for proj in ("q_proj", "k_proj", "v_proj", "o_proj") for kind in ("weight", "bias")):
        if name in expected:
            np.testing.assert_array_equal(decode.graph.initializers[name].const_value.numpy(),
                                          expected[name].numpy())
    with pytest.raises(ir.passes.PreconditionError, match="already permuted"):
        PermuteKVHeads(plan, arch)(decode)
    identity = Plan(tuple(LayerPlan(tuple(range(arch.n_kv_heads)), (), None)
                          for _ in range(arch.n_layers)))
    _, _, fresh = source("qwen2")
    assert not PermuteKVHeads(identity, arch)(fresh).modified


def test_permute_pass_refuses_a_served_order_plan() -> None:
    """A plan rewritten for permuted weights would permute the source graph wrongly."""
    loaded, _, decode = source("llama")
    plan = tiny_plan(loaded.arch)
    with pytest.raises(ir.passes.PreconditionError, match="served order") as info:
        PermuteKVHeads(plan.to_served(permuted_by=plan), loaded.arch)(decode)
    assert "\n" not in str(info.value)
    assert "kvcompile.heads_permuted" not in decode.metadata_props


def test_prefill_rewrites() -> None:
    loaded, prefill, _ = source("gemma3_text")  # sliding layers: the rule drops their masks
    arch = loaded.arch
    plan = tiny_plan(arch, selection="key_norm")
    rule = RewritePrefillAttention(plan)
    assert rule(prefill).modified
    nodes = [node for node in prefill.graph if node.op_type == "BudgetedAttention"]
    assert len(nodes) == arch.n_layers and ("", "Attention") not in op_counts(prefill)
    assert [node.attributes["window"].value for node in nodes] == [
        layer.layout.window if layer.sliding else 0 for layer in plan.layers]
    assert {node.overload for node in nodes} == {"plain"}
    assert not rule(prefill).modified  # nothing left to rewrite
    assert RewritePrefillCache(plan, arch, CONTEXT)(prefill).modified
    specs = onnx_io.cache_tensors(plan, CONTEXT, arch.head_dim)
    assert [value.name for value in prefill.graph.outputs] == [
        onnx_io.LOGITS, *(spec.output_name for spec in specs)]
    compress = [node for node in prefill.graph if node.op_type == "CompressPrefill"]
    assert len(compress) == sum(bool(layer.budgeted_heads) for layer in plan.layers)
    assert {node.overload for node in compress} == {"key_norm"}


def test_decode_rewrite_replaces_the_cache_and_the_attention() -> None:
    loaded, _, decode = source("llama")
    arch = loaded.arch
    plan = tiny_plan(arch)
    PermuteKVHeads(plan, arch)(decode)
    assert RewriteDecode(plan, arch, CONTEXT)(decode).modified
    specs = onnx_io.cache_tensors(plan, CONTEXT, arch.head_dim)
    assert [value.name for value in decode.graph.inputs] == [
        onnx_io.INPUT_IDS, onnx_io.PAST_LENGTH, *(spec.input_name for spec in specs)]
    counts = op_counts(decode)
    assert ("", "Attention") not in counts
    assert counts["kvcompile", "BudgetedCacheUpdate"] == sum(
        bool(layer.budgeted_heads) for layer in plan.layers)
    assert counts["", "TensorScatter"] == 2 * sum(bool(layer.full_heads) for layer in plan.layers)
    with pytest.raises(ir.passes.PreconditionError, match="not a source decode graph"):
        RewriteDecode(plan, arch, CONTEXT)(decode)


def test_attach_function_bodies_once_per_op_and_overload() -> None:
    loaded, _, decode = source("llama")
    arch = loaded.arch
    plan = tiny_plan(arch)
    PermuteKVHeads(plan, arch)(decode)
    RewriteDecode(plan, arch, CONTEXT)(decode)
    assert AttachFunctionBodies()(decode).modified
    assert sorted(decode.functions) == [
        ("kvcompile", "BudgetedAttention", "bias"), ("kvcompile", "BudgetedAttention", "length"),
        ("kvcompile", "BudgetedCacheUpdate", "")]
    assert all(dict(f.opset_imports) == {"": onnx_io.OPSET} for f in decode.functions.values())
    assert decode.opset_imports[onnx_io.DOMAIN] == onnx_io.DOMAIN_VERSION
    assert not AttachFunctionBodies()(decode).modified


def _rewritten_decode():
    loaded, _, decode = source("llama")
    arch = loaded.arch
    plan = tiny_plan(arch)
    for compiler_pass in static_budget_passes("decode", plan, arch, CONTEXT)[:-1]:
        compiler_pass(decode)
    return ValidateStaticBudgetGraph(plan, arch, CONTEXT, "decode"), decode


def test_validation_accepts_the_rewritten_graph_and_changes_nothing() -> None:
    validate, decode = _rewritten_decode()
    assert not validate(decode).modified


@pytest.mark.parametrize("breakage,message", [
    ("dynamic cache", "static"),
    ("foreign domain", "domain"),
    ("standard attention", "Attention"),
])
def test_validation_refuses_a_broken_graph(breakage: str, message: str) -> None:
    validate, decode = _rewritten_decode()
    graph = decode.graph
    if breakage == "dynamic cache":
        value = graph.inputs[2]
        value.shape = ir.Shape([onnx_io.BATCH, value.shape[1], "slots", value.shape[3]])
    elif breakage == "foreign domain":
        node = next(n for n in graph if n.op_type == "BudgetedCacheUpdate")
        node.domain = "com.example"
    else:
        node = next(n for n in graph if n.op_type == "BudgetedAttention")
        node.domain, node.op_type, node.overload = "", "Attention", ""
    with pytest.raises((StaticBudgetGraphError, ir.passes.PassError), match=message):
        validate(decode)


# ------------------------------------------------------------------ the function bodies


def run_op(op: str, overload: str, inputs: list, attributes: dict, outputs: int) -> list:
    """One kvcompile node with its reference body, in onnxruntime (nothing registered)."""
    values = []
    for index, array in enumerate(inputs):
        if array is None:
            values.append(None)
            continue
        dtype = ir.DataType.from_numpy(array.dtype)  # float32, int64; codes: uint8, float16
        values.append(ir.Value(name=f"in{index}", type=ir.TensorType(dtype),
                               shape=ir.Shape(array.shape)))
    node = ir.Node(onnx_io.DOMAIN, op, values, num_outputs=outputs, overload=overload,
                   attributes=[ir.convenience.convert_attribute(k, v) for k, v in attributes.items()])
    for index, value in enumerate(node.outputs):
        value.name = f"out{index}"
    graph = ir.Graph([v for v in values if v is not None], list(node.outputs), nodes=[node],
                     opset_imports={"": onnx_io.OPSET, onnx_io.DOMAIN: onnx_io.DOMAIN_VERSION})
    model = ir.Model(graph, ir_version=10, functions=[function_for(op, overload)])
    feed = {f"in{i}": array for i, array in enumerate(inputs) if array is not None}
    return session(model).run(None, feed)


def test_attention_bodies_equal_the_torch_op() -> None:
    gen = torch.Generator().manual_seed(1)
    b, hkv, g, s, d = 2, 3, 3, 11, 8
    k, v = torch.randn(b, hkv, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    q = torch.randn(b, hkv * g, 1, d, generator=gen)
    bias = torch.zeros(b, hkv, s)
    bias[:, :, 3], bias[:, :, 1], bias[1, 2] = float("-inf"), 2.3, float("-inf")  # a dead row
    expected = budgeted_attention(q, k, v, bias, scale=0.3)
    out = run_op("BudgetedAttention", "bias", [q.numpy(), k.numpy(), v.numpy(), bias.numpy()],
                 {"causal": 0, "window": 0, "scale": 0.3}, 1)[0]
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-6, rtol=0)
    assert not out[1, 2 * g:].any()  # no visible key: zeros, not NaN
    lengths = torch.tensor([5, 9])
    q3 = torch.randn(b, hkv * g, 2, d, generator=gen)
    expected = budgeted_attention(q3, k, v, None, causal=True, scale=0.3, kv_length=lengths)
    out = run_op("BudgetedAttention", "length",
                 [q3.numpy(), k.numpy(), v.numpy(), None, lengths.numpy()],
                 {"causal": 1, "window": 0, "scale": 0.3}, 1)[0]
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk", [1024, 4])  # 4: eight query chunks, windows across them
def test_prefill_attention_body_equals_the_torch_op(chunk: int, monkeypatch) -> None:
    from kvcompile.passes.onnx import functions

    monkeypatch.setattr(functions, "QUERY_CHUNK", chunk)
    gen = torch.Generator().manual_seed(4)
    b, hkv, g, s, d = 2, 2, 3, 30, 8
    q = torch.randn(b, hkv * g, s, d, generator=gen)
    k, v = torch.randn(b, hkv, s, d, generator=gen), torch.randn(b, hkv, s, d, generator=gen)
    for causal, window in ((1, 0), (1, 5), (1, 13), (0, 0)):
        expected = budgeted_attention(q, k, v, None, causal=bool(causal), window=window,
                                      scale=0.3)
        out = run_op("BudgetedAttention", "plain", [q.numpy(), k.numpy(), v.numpy()],
                     {"causal": causal, "window": window, "scale": 0.3}, 1)[0]
        np.testing.assert_allclose(out, expected.numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", [BudgetLayout(2, 1, 3, 4), BudgetLayout(0, 0, 0, 5),
                                    BudgetLayout(1, 0, 2, 3), BudgetLayout(2, 1, 0, 3)])
@pytest.mark.parametrize("selection", ["attention", "key_norm"])
def test_compress_prefill_body_equals_the_torch_cache(layout: BudgetLayout, selection: str) -> None:
    """Prompts shorter than the sinks, filling the window, and past the capacity."""
    gen = torch.Generator().manual_seed(2)
    b, h, g, d = 2, 2, 3, 8
    attributes = {"sinks": layout.sinks, "compensation": layout.compensation,
                  "selected": layout.selected, "window": layout.window,
                  "observation_window": 4, "scale": 0.3}
    for length in (1, 3, 6, 9, 15, 30):
        q = torch.randn(b, h * g, length, d, generator=gen)
        k, v = torch.randn(b, h, length, d, generator=gen), torch.randn(b, h, length, d, generator=gen)
        needs = length - layout.sinks - layout.window > layout.selected > 0  # as LayerKV.store
        scores = selection_scores(q, k, 0.3, selection, 4) if needs else None
        expected = compress_prefill(k, v, scores, layout)
        k_buf, v_buf, bias, counters = run_op("CompressPrefill", selection,
                                              [q.numpy(), k.numpy(), v.numpy()], attributes, 4)
        np.testing.assert_allclose(k_buf, expected.k.numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(v_buf, expected.v.numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(bias, expected.bias.numpy(), atol=1e-6, rtol=0)
        np.testing.assert_array_equal(counters, expected.counters.numpy())


@pytest.mark.parametrize("layout", [BudgetLayout(2, 1, 3, 4), BudgetLayout(0, 0, 0, 5),
                                    BudgetLayout(1, 0, 2, 3), BudgetLayout(0, 1, 0, 1)])
def test_cache_update_body_equals_the_torch_op(layout: BudgetLayout) -> None:
    """25 steps, far past the capacity, with the two rows out of step."""
    gen = torch.Generator().manual_seed(3)
    b, h, d = 2, 2, 4
    buffer = BudgetedBuffer.empty(b, h, d, layout)
    for _ in range(3):  # row 1 ahead by three tokens
        new = torch.randn(1, h, 1, d, generator=gen)
        budgeted_cache_update(buffer.k[1:], buffer.v[1:], buffer.bias[1:], buffer.counters[1:],
                              new, new, layout)
    state = [t.numpy().copy() for t in (buffer.k, buffer.v, buffer.bias, buffer.counters)]
    attributes = {"sinks": layout.sinks, "compensation": layout.compensation,
                  "selected": layout.selected, "window": layout.window}
    for _ in range(25):
        k_new, v_new = torch.randn(b, h, 1, d, generator=gen), torch.randn(b, h, 1, d, generator=gen)
        budgeted_cache_update(buffer.k, buffer.v, buffer.bias, buffer.counters, k_new, v_new, layout)
        state = run_op("BudgetedCacheUpdate", "", [*state, k_new.numpy(), v_new.numpy()],
                       attributes, 4)
        np.testing.assert_allclose(state[0], buffer.k.numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(state[1], buffer.v.numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(state[2], buffer.bias.numpy(), atol=1e-6, rtol=0)
        np.testing.assert_array_equal(state[3], buffer.counters.numpy())


@pytest.mark.parametrize("count", [73223, 999983])
def test_cache_update_body_stores_the_one_compensation_bias(count: int) -> None:
    """The fold's ln n is the runtime's one definition (``ops.log_count``: float64, rounded
    once) bit for bit, at counts where torch's float32 log is an ulp off it."""
    layout = BudgetLayout(0, 1, 0, 1)
    buffer = BudgetedBuffer.empty(1, 1, 2, layout)
    buffer.counters.copy_(torch.tensor([[0, count, 0, count - 1]]))  # the next token folds the n-th
    buffer.bias.zero_()
    state = [t.numpy().copy() for t in (buffer.k, buffer.v, buffer.bias, buffer.counters)]
    new = torch.randn(1, 1, 1, 2)
    budgeted_cache_update(buffer.k, buffer.v, buffer.bias, buffer.counters, new, new, layout)
    attributes = {"sinks": 0, "compensation": 1, "selected": 0, "window": 1}
    bias = run_op("BudgetedCacheUpdate", "", [*state, new.numpy(), new.numpy()], attributes, 4)[2]
    assert bias[0, 0, 0] == buffer.bias[0, 0, 0].item() == log_count(count, torch.float32)


# ------------------------------------------------------------------ the rewritten graphs


def _torch_state(cache, filled: int) -> dict[str, np.ndarray]:
    """A one-row torch cache as the graphs' ``present.*`` tensors of that row (full buffers cut
    to their ``filled`` slots; the slots after them hold nothing)."""
    state = {}
    for index, layer in enumerate(cache.layers):
        if layer.full is not None:
            for part, buffer in zip(onnx_io.FULL_PARTS, (layer.full.k, layer.full.v), strict=True):
                state[onnx_io.present(index, part)] = buffer[0, :, :filled].numpy()
        if layer.budgeted is not None:
            kept = layer.budgeted
            for part, buffer in zip(onnx_io.BUDGET_PARTS, (kept.k, kept.v, kept.bias, kept.counters),
                                    strict=True):
                state[onnx_io.present(index, part)] = buffer[0].numpy()
    return state


def _assert_rows_equal(logits: np.ndarray, found: dict[str, np.ndarray], expected: list,
                       caches: list, filled: int) -> None:
    """Each row of the graph's logits and state equals its own single-row torch run."""
    for row, (want, cache) in enumerate(zip(expected, caches, strict=True)):
        np.testing.assert_allclose(logits[row], want[0].numpy(), atol=1e-4, rtol=0)
        state = _torch_state(cache, filled)
        assert set(state) == set(found)  # every state tensor of the graph is compared
        for name, value in state.items():
            got = found[name][row]
            if name.endswith(onnx_io.FULL_PARTS):
                got = got[:, :filled]
            if name.endswith("budget_counters"):
                np.testing.assert_array_equal(got, value, err_msg=f"row {row} {name}")
            elif name.endswith("budget_bias"):
                np.testing.assert_allclose(got, value, atol=1e-6, rtol=0, err_msg=f"row {row} {name}")
            else:  # keys and values: float32 noise, relative to their size after a few layers
                np.testing.assert_allclose(got, value, atol=1e-5, rtol=1e-5,
                                           err_msg=f"row {row} {name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_static_budget_graphs_equal_the_torch_runtime(family: str) -> None:
    """Batch 2, rows of different tokens: after a prefill past every capacity and after each of
    40 decode steps, each row's logits and whole cache state (full buffers, budgeted slots, bias,
    counters) equal that row's own single-row torch runtime (function bodies, nothing
    registered). Rows of different lengths are out of reach: the graphs take one past length."""
    loaded, prefill, decode = source(family)
    arch = loaded.arch
    plan = tiny_plan(arch, selection="key_norm" if family == "qwen2" else "attention")
    for kind, graph in (("prefill", prefill), ("decode", decode)):
        run_static_budget_passes(graph, kind, plan, arch, CONTEXT)  # as the build runs them
    _, engine = compile_engine(loaded, plan, max_context=CONTEXT)
    prompt, steps = 30, 40
    tokens = ids(2, prompt + steps, seed=5)
    assert prompt > max(layer.layout.capacity for layer in plan.layers if layer.layout)
    assert (tokens[0] != tokens[1]).mean() > 0.9  # different content in every stretch
    caches = [engine.allocate(1, max_context=CONTEXT) for _ in range(2)]
    expected = [engine.prefill(torch.from_numpy(tokens[row:row + 1, :prompt]), [caches[row]])
                for row in range(2)]
    logits, *state = session(prefill).run(None, {onnx_io.INPUT_IDS: tokens[:, :prompt]})
    names = [value.name for value in prefill.graph.outputs[1:]]
    found = dict(zip(names, state, strict=True))
    _assert_rows_equal(logits, found, expected, caches, prompt)
    assert np.abs(logits[0] - logits[1]).max() > 1e-2  # the rows cannot stand in for each other
    assert all(layer.budgeted is None or layer.budgeted.counters[0, 1] > layer.budgeted.layout.window
               for layer in caches[0].layers)  # every ring wrapped
    step = session(decode)
    for t in range(prompt, prompt + steps):
        expected = [engine.extend(torch.from_numpy(tokens[row:row + 1, t:t + 1]), caches[row])
                    for row in range(2)]
        feed = {onnx_io.INPUT_IDS: tokens[:, t:t + 1],
                onnx_io.PAST_LENGTH: np.full(2, t, dtype=np.int64),
                **{name.replace("present.", "past.", 1): value for name, value in found.items()}}
        logits, *state = step.run(None, feed)
        found = dict(zip(names, state, strict=True))
        _assert_rows_equal(logits, found, expected, caches, t + 1)


# ------------------------------------------------------------------ the pass manager


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_pass_manager_run_equals_the_passes_one_by_one(kind: str) -> None:
    """Under onnx-ir's PassManager the graph and each pass's ``modified`` are what running
    the passes by hand gives (the build report lists the latter)."""
    loaded, prefill, decode = source("gemma3_text")
    _, prefill_by_hand, decode_by_hand = source("gemma3_text")
    arch = loaded.arch
    plan = tiny_plan(arch)
    managed = prefill if kind == "prefill" else decode
    by_hand = prefill_by_hand if kind == "prefill" else decode_by_hand
    log = run_static_budget_passes(managed, kind, plan, arch, CONTEXT)
    expected = [{"pass": type(p).__name__, "modified": p(by_hand).modified}
                for p in static_budget_passes(kind, plan, arch, CONTEXT)]
    assert log == expected
    assert [entry["modified"] for entry in log].count(True) >= 3
    assert ir.to_proto(managed).SerializeToString() == ir.to_proto(by_hand).SerializeToString()


def test_pass_manager_names_the_pass_that_refused_the_graph() -> None:
    """The manager wraps a refusal twice; the build still names the pass and its reason."""
    loaded, _, decode = source("llama")
    plan = tiny_plan(loaded.arch)
    PermuteKVHeads(plan, loaded.arch)(decode)
    with pytest.raises(PassFailed) as info:
        run_static_budget_passes(decode, "decode", plan, loaded.arch, CONTEXT)
    assert info.value.pass_name == "PermuteKVHeads"
    assert isinstance(info.value.reason, ir.passes.PreconditionError)
    assert "already permuted" in str(info.value.reason)


def test_pass_manager_lets_a_bug_in_a_pass_through(monkeypatch) -> None:
    """Only refusals become PassFailed (one line in the build); a bug keeps its own type."""
    loaded, _, decode = source("llama")

    def broken(self, model):
        raise KeyError("a bug")

    monkeypatch.setattr(RewriteDecode, "call", broken)
    with pytest.raises(KeyError, match="a bug"):
        run_static_budget_passes(decode, "decode", tiny_plan(loaded.arch), loaded.arch, CONTEXT)


def test_a_refused_graph_is_one_build_line_naming_the_pass(tmp_path, monkeypatch) -> None:
    """write_onnx (the build) turns a pass's refusal into one ArtifactError line: the pass,
    the graph, the reason's first line and ``--no-onnx``; nothing is saved."""
    from kvcompile.build.onnx_graphs import write_onnx
    from kvcompile.errors import ArtifactError

    def refuse(self, model):
        raise ir.passes.PreconditionError("no cache input here\nmore detail")

    monkeypatch.setattr(RewriteDecode, "requires", refuse)
    loaded = tiny_loaded("llama", seed=3, max_position_embeddings=512)
    with pytest.raises(ArtifactError) as info:
        write_onnx(tmp_path / "onnx", loaded.build(), tiny_plan(loaded.arch), CONTEXT)
    assert str(info.value) == ("the ONNX pass RewriteDecode failed on the decode graph (no cache "
                               "input here); build with --no-onnx to skip the ONNX graphs")
    assert list((tmp_path / "onnx").iterdir()) == []
