"""The one memory definition against the caches transformers itself allocates.

Reference: transformers' ``StaticCache`` (sliding layers: ``min(window, max_cache_len)``
tokens), measured by running the tiny model into it; the runtime's buffers and the fit's
budget must agree with it.
"""
from __future__ import annotations

import json
import math
import re
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcompile.memory as memory
from kvcompile.arch import arch_from_config
from kvcompile.errors import BudgetError
from kvcompile.fit.greedy import fit, smallest_budget
from kvcompile.memory import (
    budget_slots,
    memory_ratio,
    memory_table,
    plan_bytes,
    plan_memory_ratio,
    uncompressed_bytes,
    uncompressed_slots,
)
from kvcompile.plan import Plan
from kvcompile.runtime.cache import StaticKVCache
from kvcompile.settings import FitSettings
from tests.tiny import tiny_hf_model

SLIDING = {"gemma3_text": dict(sliding_window=24), "mistral": dict(sliding_window=24)}


def _hf_cache_bytes(model, cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _static_cache_bytes(model, context: int) -> int:
    """Bytes of transformers' StaticCache for ``context`` tokens (allocated on the first forward)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=context)
    with torch.no_grad():
        model(torch.tensor([[3, 4]]), cache=cache, use_cache=True)
    return _hf_cache_bytes(model, cache)


@pytest.mark.parametrize("family", ["gemma3_text", "mistral", "llama"])
@pytest.mark.parametrize("context", [8, 24, 100])
def test_uncompressed_bytes_equal_transformers_static_cache(family: str, context: int) -> None:
    model = tiny_hf_model(family, **SLIDING.get(family, {}))
    arch = arch_from_config(model.config)
    assert uncompressed_bytes(arch, context, 4) == _static_cache_bytes(model, context)


@pytest.mark.parametrize("family", ["gemma3_text", "mistral"])
def test_dynamic_sliding_layers_keep_one_token_less_between_steps(family: str) -> None:
    """The documented difference: DynamicCache keeps ``window - 1`` tokens per sliding layer."""
    from transformers import DynamicCache

    model = tiny_hf_model(family, **SLIDING.get(family, {}))
    arch = arch_from_config(model.config)
    context = 100
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(3, 90, (1, context)), cache=cache, use_cache=True)
    sliding_layers = sum(1 for w in arch.sliding_windows if w)
    per_token = arch.n_kv_heads * 2 * arch.head_dim * 4
    assert _hf_cache_bytes(model, cache) == uncompressed_bytes(arch, context, 4) - sliding_layers * per_token


def _runtime_kv_tensor_bytes(cache: StaticKVCache) -> int:
    """Bytes of the runtime's key and value tensors alone (no bias, counters, lengths)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for buf in (layer.full, layer.budgeted) if buf is not None for t in (buf.k, buf.v))


@pytest.mark.parametrize("family", ["gemma3_text", "mistral", "llama"])
@pytest.mark.parametrize("context", [8, 24, 100])
def test_runtime_buffers_of_the_uncompressed_plan_equal_transformers(family: str, context: int) -> None:
    """Keys and values: what transformers allocates; the rest of the state, by hand: a full
    layer's int64 length, a sliding ring's float32 bias per slot and four int64 counters."""
    model = tiny_hf_model(family, **SLIDING.get(family, {}))
    arch = arch_from_config(model.config)
    plan = Plan.uncompressed(arch.n_layers, arch.n_kv_heads, arch.sliding_windows)
    cache = StaticKVCache.allocate(plan, 1, context, arch.head_dim, arch.group_size)
    assert _runtime_kv_tensor_bytes(cache) == _static_cache_bytes(model, context)
    extra = sum(arch.n_kv_heads * min(window, context) * 4 + 4 * 8 if window else 8
                for window in arch.sliding_windows)
    assert cache.nbytes == _static_cache_bytes(model, context) + extra == plan_bytes(plan, arch, context, 4)
    # at the bfloat16 baseline: the same state, keys and values at 2 bytes, over the source cache
    source_bf16 = _static_cache_bytes(model, context) // 2
    assert plan_memory_ratio(plan, arch, context) == (source_bf16 + extra) / source_bf16


def test_fitted_gemma_plan_counts_sliding_layers_at_their_window() -> None:
    """At 256 tokens the sliding layers hold 24: the budget is a share of that cache."""
    arch = arch_from_config(tiny_hf_model("gemma3_text", **SLIDING["gemma3_text"]).config)
    context = 256
    for policy in ("uniform", "pyramid"):
        result = fit(None, arch, FitSettings(kv_budget=0.5, at_context=context, policy=policy, min_window=4))
        cache = StaticKVCache.allocate(result.plan, 1, context, arch.head_dim, arch.group_size)
        reference = 2 * 4 * 24 + 2 * 4 * 256  # two sliding layers at their window, two full layers
        assert cache.nbytes == plan_bytes(result.plan, arch, context, 4)
        # the ratio counts values in bfloat16: a bfloat16 cache over the bfloat16 source cache
        bf16 = StaticKVCache.allocate(result.plan, 1, context, arch.head_dim, arch.group_size,
                                      dtype=torch.bfloat16)
        assert bf16.nbytes / (reference * 2 * arch.head_dim * 2) == pytest.approx(
            plan_memory_ratio(result.plan, arch, context))
        assert 0.45 < plan_memory_ratio(result.plan, arch, context) <= 0.5
        rows = {row["context"]: row for row in memory_table(result.plan, arch, 4, extra=(context,))}
        assert rows[context]["uncompressed_bytes"] == reference * 2 * arch.head_dim * 4


@pytest.mark.parametrize("policy", ["profiled", "uniform"])
def test_budget_below_the_sliding_layers_names_the_smallest_feasible(policy: str) -> None:
    from kvcompile.profile.statistics import HeadStatistics

    arch = arch_from_config(tiny_hf_model("gemma3_text", **SLIDING["gemma3_text"]).config)
    shape = (arch.n_layers, arch.n_kv_heads)
    stats = HeadStatistics((16, 32), *(torch.rand(shape) for _ in range(6)), error=torch.zeros((*shape, 2)))
    context = 256
    with pytest.raises(BudgetError) as caught:
        fit(stats, arch, FitSettings(kv_budget=0.05, at_context=context, policy=policy))
    message = str(caught.value)
    assert "\n" not in message
    smallest = float(re.search(r"smallest feasible budget at 256 tokens is ([0-9.]+)", message).group(1))
    per_head = 5 if policy == "uniform" else 4 + 1 + 16
    assert smallest == smallest_budget(arch, context, per_head)
    # by hand, in bf16 bytes: 2 sliding layers x 4 heads x 24 + 2 x 4 x per_head slots of a key,
    # a value and a float32 bias, 4 int64 counters per layer; over 2 x 4 x (24 + 256) slots
    slot = 2 * arch.head_dim * 2
    needed = (8 * 24 + 8 * per_head) * (slot + 4) + 4 * 4 * 8
    assert smallest == math.ceil(needed / (8 * 280 * slot) * 1e4) / 1e4
    result = fit(stats, arch, FitSettings(kv_budget=smallest, at_context=context, policy=policy))
    assert plan_memory_ratio(result.plan, arch, context) <= smallest
    with pytest.raises(BudgetError):
        fit(stats, arch, FitSettings(kv_budget=smallest - 2e-4, at_context=context, policy=policy))


def test_all_sliding_model_needs_its_whole_window() -> None:
    """Mistral-style: every layer slides, so nothing is left to compress below the windows."""
    arch = arch_from_config(tiny_hf_model("mistral", **SLIDING["mistral"]).config)
    # the windows' float32 biases and counters make even the model's own windows dearer than
    # its bf16 cache, so no budget in (0, 1] fits (a budget of 1 would compress nothing anyway)
    for budget in (0.5, 1.0):
        with pytest.raises(BudgetError, match=r"smallest feasible budget at 256 tokens is 1\.\d+$"):
            fit(None, arch, FitSettings(kv_budget=budget, at_context=256, policy="uniform"))


# ----------------------------------------------------------------------------- the ratio, once


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**9), st.integers(1, 10**9), st.sampled_from([2 * 64 * 2, 2 * 128 * 4, 2 * 256 * 1]))
def test_memory_ratio_is_exact_and_slots_give_the_bytes_float(kv: int, baseline: int, slot: int) -> None:
    """Bytes over bytes, rounded once (reference: the exact fraction); slots give the same float."""
    assert memory_ratio(kv, baseline) == float(Fraction(kv, baseline))
    assert memory_ratio(kv * slot, baseline * slot) == memory_ratio(kv, baseline)


def test_memory_ratio_refuses_an_empty_baseline() -> None:
    for baseline in (0, -4):
        with pytest.raises(ValueError, match="baseline KV memory must be positive"):
            memory_ratio(10, baseline)


@pytest.mark.parametrize("family", ["gemma3_text", "llama"])
def test_budget_slots_are_the_most_slots_within_the_budget(family: str) -> None:
    arch = arch_from_config(tiny_hf_model(family, **SLIDING.get(family, {})).config)
    for context in (40, 256):
        total = uncompressed_slots(arch, context)
        for budget in (0.05, 0.125, 1 / 3, 0.5, 0.999, 1.0):
            slots = budget_slots(arch, context, budget)
            assert Fraction(slots, total) <= Fraction(budget) < Fraction(slots + 1, total)
            assert memory_ratio(slots, total) <= budget


def _patch_memory_ratio(monkeypatch: pytest.MonkeyPatch, marked) -> None:  # noqa: ANN001 - a function
    """Replace :func:`memory_ratio` in every loaded module that holds it (by import or by name)."""
    original = memory.memory_ratio
    for module in list(sys.modules.values()):
        if getattr(module, "memory_ratio", None) is original:
            monkeypatch.setattr(module, "memory_ratio", marked)


def test_profile_build_inspect_and_eval_print_the_one_ratio(tmp_path: Path, monkeypatch) -> None:
    """The same plan at the same context: the profile's summary, the build report's table,
    ``kvcompile inspect`` and the eval report (``kv_memory.ratio`` and the row's
    ``memory_ratio``) carry one number, made by :func:`memory_ratio`, with values counted in
    bfloat16 although everything here computes in float32.

    To see that each place calls the one function rather than dividing on its own, the function
    is replaced by a marked one (half the ratio) for the whole run: every place must print the
    marked number. The bytes it is given are checked against a bfloat16 cache the runtime
    allocates and transformers' own bfloat16 ``StaticCache``.
    """
    from click.testing import CliRunner
    from rich.console import Console

    import kvcompile.eval.evaluate  # noqa: F401 - loaded before the patch, so it is patched too
    from kvcompile.build.artifact import build_artifact
    from kvcompile.cli import main
    from kvcompile.eval.evaluate import EvalConfig, evaluate
    from kvcompile.eval.tasks import EvalCase
    from kvcompile.fit.summary import print_profile_summary
    from kvcompile.profile.record import load_profile, save_profile
    from kvcompile.runtime import load
    from tests.test_profile_io import REQUEST, saved_tiny_model

    original = memory.memory_ratio
    _patch_memory_ratio(monkeypatch, lambda kv, baseline: original(kv, baseline) / 2)
    context = REQUEST.at_context  # the profile's table has this row; the build's, its max context
    _, loaded, profile = saved_tiny_model(tmp_path)
    save_profile(profile, tmp_path / "profile.yaml")
    profile = load_profile(tmp_path / "profile.yaml")
    arch = loaded.arch

    # reference: the plan's state allocated in bfloat16 over transformers' bfloat16 StaticCache
    allocated = StaticKVCache.allocate(profile.plan, 1, context, arch.head_dim, arch.group_size,
                                       dtype=torch.bfloat16).nbytes
    source_cache = _static_cache_bytes(tiny_hf_model("qwen2", seed=6).to(torch.bfloat16), context)
    true_ratio = float(Fraction(allocated, source_cache))
    assert 0.1 < true_ratio < 0.9  # a compressed plan, so the marked number differs from 1 / 2
    marked = true_ratio / 2

    def table_ratio(text: str) -> str:
        (line,) = [line for line in text.splitlines() if re.match(rf"\W+{context}\W.*KiB", line)]
        return line.split()[-2]

    console = Console(record=True, width=240)
    print_profile_summary(console, profile)
    assert table_ratio(console.export_text()) == f"{marked:.4f}"

    build_artifact(loaded, profile, tmp_path / "artifact", max_context=context, onnx=False)
    build_report = json.loads((tmp_path / "artifact" / "build-report.json").read_text())
    assert build_report["memory"]["baseline_dtype"] == "bfloat16"
    (build_row,) = [row for row in build_report["memory"]["table"] if row["context"] == context]
    assert build_row["ratio"] == round(marked, 4)
    assert build_row["kv_bytes"] == allocated and build_row["uncompressed_bytes"] == source_cache

    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "artifact")])
    assert shown.exit_code == 0, shown.output
    assert table_ratio(shown.output) == f"{marked:.4f}"

    gen = torch.Generator().manual_seed(0)
    case = EvalCase("continuation", context, 0.0, tuple(torch.randint(3, 90, (context,), generator=gen).tolist()),
                    (), "", tuple(torch.randint(3, 90, (8,), generator=gen).tolist()))
    engine = load(tmp_path / "artifact", max_context=2 * context)  # room for the continuation
    report = evaluate(engine, EvalConfig(agreement_tokens=2), cases=[case])
    mem = report.memory
    assert mem.context == context and mem.baseline_dtype == "bfloat16"
    assert (mem.artifact_bytes, mem.baseline_bytes) == (allocated, source_cache)
    assert mem.ratio == round(marked, 6)
    assert report.rows[0].memory_ratio == round(marked, 6)
    # what the float32 runtime really allocated, reported beside the ratio, not in it
    assert mem.allocated_dtype == "float32"
    assert mem.allocated_bytes == StaticKVCache.allocate(profile.plan, 1, context, arch.head_dim,
                                                         arch.group_size).nbytes


def test_profile_memory_rows_count_values_at_the_baseline_dtype(tmp_path: Path) -> None:
    """The rows a profile stores are the ones its summary prints (bfloat16 values)."""
    from tests.test_profile_io import REQUEST, saved_tiny_model

    context = REQUEST.at_context
    _, loaded, profile = saved_tiny_model(tmp_path)
    arch = loaded.arch
    (row,) = [row for row in profile.memory if row["context"] == context]
    allocated = StaticKVCache.allocate(profile.plan, 1, context, arch.head_dim, arch.group_size,
                                       dtype=torch.bfloat16).nbytes
    assert (row["kv_bytes"], row["uncompressed_bytes"]) == (allocated, uncompressed_bytes(arch, context, 2))


def test_an_impossible_budget_is_refused_before_calibration(monkeypatch) -> None:
    """A target below every head's smallest layout fails in check_request, before a single
    calibration prompt is built (it used to fail inside the fit, after calibration)."""
    import kvcompile.fit.pipeline as pipeline
    from kvcompile.profile.calibration import CalibConfig
    from tests.tiny import tiny_loaded

    SMALL_CALIB = CalibConfig(text_length=128, probe_length=128, repeat_block=32)  # noqa: N806
    loaded = tiny_loaded("gemma3_text", sliding_window=24)
    request = FitSettings(kv_budget=0.01, at_context=256)
    smallest = smallest_budget(loaded.arch, 256, request.sinks + request.compensation + 1)
    assert request.kv_budget < smallest  # the target is infeasible by the definition

    def calibrate(*args, **kwargs):
        raise AssertionError("calibration ran before the budget was checked")

    monkeypatch.setattr(pipeline, "build_calibration_set", calibrate)
    with pytest.raises(BudgetError, match="--kv-budget") as caught:
        pipeline.run_profile(loaded, SMALL_CALIB, request)
    assert "\n" not in str(caught.value)
    # a feasible budget gets past the check and reaches calibration
    with pytest.raises(AssertionError, match="calibration ran"):
        pipeline.run_profile(loaded, SMALL_CALIB, FitSettings(kv_budget=0.9, at_context=256))
