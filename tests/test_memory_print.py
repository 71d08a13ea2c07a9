"""What ``kvcompile inspect`` prints about memory, and the runtime's bytes of every precision.

References: the tensors the runtime really allocates (walked one by one, not through the
buffers' own ``nbytes``), the cache transformers' model would hold at the same context, and
arithmetic by hand for one group.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kvcompile.memory import plan_state_bytes
from kvcompile.plan import BudgetLayout, LayerPlan, Plan, Storage
from kvcompile.runtime.cache import StaticKVCache

CONTEXT = 128
FULL = (Storage(8, 4, 32), Storage(4, 2, 16))  # layer 0, layer 1
BUDGET = (Storage(8, 4, 4), Storage(2, 2, 3))


def _tensors(obj: object, seen: set[int]) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``obj`` through dataclass fields and tuples, once each."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:
            seen.add(id(obj))
            yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name), seen)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item, seen)


def _state_bytes(obj: object) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj, set()))


def _quantized(plan: Plan) -> Plan:
    layers = tuple(replace(layer, full_storage=full, budget_storage=budget)
                   for layer, full, budget in zip(plan.layers, FULL, BUDGET, strict=True))
    return replace(plan, layers=layers)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A tiny qwen2 artifact (two layers, each with full and budgeted heads), context 128."""
    from kvcompile.build.artifact import build_artifact
    from tests.test_profile_io import saved_tiny_model

    root = tmp_path_factory.mktemp("inspect")
    _, loaded, profile = saved_tiny_model(root)
    assert len(profile.plan.layers) == 2
    heads = loaded.arch.n_kv_heads  # every layer with both groups, whatever the tiny fit chose
    profile.plan = replace(profile.plan, layers=tuple(
        LayerPlan((0,), tuple(range(1, heads)), BudgetLayout(2, 1, 40, 16)) for _ in range(2)))
    build_artifact(loaded, profile, root / "artifact", max_context=CONTEXT, onnx=False)
    return root / "artifact"


def _inspect(artifact: Path, monkeypatch, *options: str) -> tuple[str, object]:
    """``kvcompile inspect`` of the artifact served with quantized groups (a build refuses
    them today: its parity check wants the uncompressed model's logits within capacity)."""
    import kvcompile.build.artifact as build

    original = build.load_engine
    engines = []

    def quantized_engine(path):  # noqa: ANN001, ANN202 - stands in for load_engine
        engine = original(path)
        engine.plan = _quantized(engine.plan)  # same heads in the same order: same weights
        engines.append(engine)
        return engine

    monkeypatch.setattr(build, "load_engine", quantized_engine)
    result = CliRunner().invoke(main_command(), ["inspect", str(artifact), *options])
    assert result.exit_code == 0, result.output
    return result.output, engines[0]


def main_command():  # noqa: ANN201 - the click group
    from kvcompile.cli import main

    return main


def _storage_rows(output: str) -> dict[int, list[str]]:
    """Rows of the storage table: layer -> [full, bits, budgeted, bits]."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 5 and cells[0].isdigit() and re.fullmatch(r"k\d+v\d+g\d+|full|-", cells[1]):
            rows[int(cells[0])] = cells[1:]
    return rows


def test_inspect_prints_each_groups_bits_per_value_of_a_quantized_plan(artifact, monkeypatch) -> None:
    output, engine = _inspect(artifact, monkeypatch)
    plan, arch = engine.plan, engine.arch
    d = arch.head_dim
    # reference: the runtime's own bfloat16 tensors of each group, over the values it holds
    cache = StaticKVCache.allocate(plan, 1, CONTEXT, d, arch.group_size, dtype=torch.bfloat16,
                                   device="meta")
    rows = _storage_rows(output)
    assert sorted(rows) == [0, 1]
    for i, (layer, kv) in enumerate(zip(plan.layers, cache.layers, strict=True)):
        full_bits = _state_bytes(kv.full) * 8 / (len(layer.full_heads) * CONTEXT * 2 * d)
        budget_bits = (_state_bytes(kv.budgeted) * 8
                       / (len(layer.budgeted_heads) * layer.layout.capacity * 2 * d))
        assert rows[i] == [FULL[i].name, f"{full_bits:.2f}", BUDGET[i].name, f"{budget_bits:.2f}"]
    # layer 0's full group by hand (k8v4g32, head dim d): 4 body groups of 32 tokens as codes,
    # key scale + zero per group and channel, value scale + zero per token (d <= 32: one
    # channel group), a 32-token bfloat16 residual ring and one int64 length
    heads = len(plan.layers[0].full_heads)
    by_hand = heads * (CONTEXT * (d + d // 2) + 4 * d * 4 + CONTEXT * 4 + 32 * 2 * d * 2) + 8
    assert rows[0][1] == f"{by_hand * 8 / (heads * CONTEXT * 2 * d):.2f}"
    # the plan's total, beside the ratio
    values = plan.kv_slots(CONTEXT) * 2 * d
    total = f"{_state_bytes(cache.layers) * 8 / values:.2f} bits per stored value"
    assert total in " ".join(output.split())


def test_inspect_prints_a_float32_ratio_with_its_dtype(artifact, monkeypatch) -> None:
    """At the default baseline no dtype is printed beside the ratio; at float32 it is, and
    the ratio is the float32 cache over the float32 source cache."""
    default, engine = _inspect(artifact, monkeypatch)
    wide, _ = _inspect(artifact, monkeypatch, "--baseline-dtype", "float32")
    arch = engine.arch
    source = arch.n_layers * arch.n_kv_heads * CONTEXT * 2 * arch.head_dim  # values, no sliding
    for text, dtype, size in ((default, torch.bfloat16, 2), (wide, torch.float32, 4)):
        cache = StaticKVCache.allocate(engine.plan, 1, CONTEXT, arch.head_dim, arch.group_size,
                                       dtype=dtype, device="meta")
        ratio = _state_bytes(cache.layers) / (source * size)
        note = "" if size == 2 else " (vs float32)"
        assert f"memory ratio {ratio:.4f}{note}" in " ".join(text.split())
    default, wide = (" ".join(text.split()) for text in (default, wide))
    assert "(vs float32)" not in default and "values in float32" in wide
    assert "values in bfloat16" in default


def test_inspect_refuses_an_unknown_baseline_dtype(artifact) -> None:
    result = CliRunner().invoke(main_command(), ["inspect", str(artifact), "--baseline-dtype", "int8"])
    assert result.exit_code == 2 and "int8" in result.output


PRECISIONS = [Storage(8, 8, 32), Storage(8, 4, 32), Storage(4, 4, 16), Storage(4, 2, 7),
              Storage(2, 2, 5), Storage()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [8, 15])
@pytest.mark.parametrize("storage", PRECISIONS, ids=lambda s: s.name)
def test_allocated_bytes_equal_predicted_bytes_at_every_precision(storage, head_dim, dtype) -> None:
    """Every tensor a cache allocates (walked one by one) == ``memory.plan_state_bytes``:
    quantized full and budgeted groups, a sliding ring, odd head dims, contexts that are not
    a multiple of the group, float32 and bfloat16."""
    plan = Plan((
        LayerPlan((0,), (1, 2), BudgetLayout(4, 1, 11, 6), full_storage=storage,
                  budget_storage=storage),
        LayerPlan((0, 1, 2), (), None, full_storage=storage),
        LayerPlan((), (0, 1, 2), BudgetLayout(2, 0, 9, 5), budget_storage=storage),
        LayerPlan((), (0, 1, 2), BudgetLayout(0, 0, 0, 40), sliding=True),
    ))
    for batch, context in ((1, 100), (3, 37)):
        cache = StaticKVCache.allocate(plan, batch, context, head_dim, 2, dtype)
        walked = _state_bytes(cache.layers)
        assert walked == cache.nbytes == plan_state_bytes(plan, head_dim, context, dtype.itemsize) * batch
        assert cache.overhead_bytes == _state_bytes(cache.seen) == 8 * batch


def test_eval_at_a_float32_baseline_counts_and_names_it(artifact) -> None:
    """``--baseline-dtype float32``: the ratio's bytes are the float32 state over the float32
    source cache (by hand: no sliding layers), the report names the dtype beside the ratio."""
    from kvcompile.errors import KVCompileError
    from kvcompile.eval.evaluate import EvalConfig, evaluate
    from kvcompile.eval.render import render_markdown
    from kvcompile.eval.tasks import EvalCase
    from kvcompile.runtime import load

    engine = load(artifact, max_context=2 * CONTEXT)
    gen = torch.Generator().manual_seed(1)
    case = EvalCase("continuation", 64, 0.0, tuple(torch.randint(3, 90, (64,), generator=gen).tolist()),
                    (), "", tuple(torch.randint(3, 90, (6,), generator=gen).tolist()))
    report = evaluate(engine, EvalConfig(agreement_tokens=2, baseline_dtype="float32"), cases=[case])
    mem, arch = report.memory, engine.arch
    state = StaticKVCache.allocate(engine.plan, 1, mem.context, arch.head_dim, arch.group_size)
    source = arch.n_layers * arch.n_kv_heads * mem.context * 2 * arch.head_dim * 4
    assert (mem.baseline_dtype, mem.artifact_bytes, mem.baseline_bytes) == ("float32", _state_bytes(state.layers), source)
    assert mem.ratio == report.rows[0].memory_ratio == round(_state_bytes(state.layers) / source, 6)
    assert (mem.allocated_bytes, mem.allocated_dtype) == (_state_bytes(state.layers), "float32")
    text = render_markdown(report)
    assert "| KV memory (vs float32) |" in text and "values counted in float32" in text
    with pytest.raises(KVCompileError, match="--baseline-dtype must be one of"):
        EvalConfig(baseline_dtype="float64")
