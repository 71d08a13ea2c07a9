"""Shared fixtures: the real SmolLM2 model (loaded once per test session), a tiny ONNX artifact, the Triton kernels counted."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see cli.py

import pytest  # noqa: E402

from kvcompile.models import LoadedModel, load_model  # noqa: E402


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return load_model("default")


@pytest.fixture(scope="session")
def tokenizer(smollm2: LoadedModel):
    return smollm2.tokenizer


@pytest.fixture(scope="session")
def tiny_onnx_artifact(tmp_path_factory):
    """A tiny qwen2 artifact with its ONNX graphs (context 96; every layer has full and
    budgeted heads, layout 4 sinks + compensation + 2 selected + 2 window = capacity 9), built
    once for the test files that drive the graphs row by row (pool, rows, Node.js)."""
    from dataclasses import replace

    from kvcompile.build.artifact import build_artifact
    from kvcompile.plan import BudgetLayout, LayerPlan
    from tests.test_profile_io import saved_tiny_model

    root = tmp_path_factory.mktemp("tiny-onnx")
    _, loaded, profile = saved_tiny_model(root)
    heads = loaded.arch.n_kv_heads  # the plan those tests need, whatever the tiny fit chose
    profile.plan = replace(profile.plan, layers=tuple(
        LayerPlan((0,), tuple(range(1, heads)), BudgetLayout(4, 1, 2, 2)) for _ in profile.plan.layers))
    build_artifact(loaded, profile, root / "artifact", max_context=96)
    return root / "artifact"


@pytest.fixture
def serving_triton(monkeypatch) -> dict[str, int]:
    """The ops' CUDA implementations as they run once ``enable()`` chose Triton, counting the
    kernel launches (a fallback to the reference would not count). For the kernel tests, which
    import ``tests.triton_mode`` first (the interpreter without a GPU)."""
    from kvcompile.runtime import kernels
    from kvcompile.runtime import triton_kernels as tk
    from kvcompile.runtime import triton_quant as tq

    monkeypatch.setattr(kernels, "_status", "triton")
    monkeypatch.setattr(kernels, "_triton", tk)
    monkeypatch.setattr(kernels, "_triton_quant", tq)
    calls = {"attention": 0, "update": 0, "quantized attention": 0, "quantized append": 0}
    for module, name, key in ((tk, "decode_attention", "attention"),
                              (tk, "cache_update", "update"),
                              (tq, "quantized_decode_attention", "quantized attention"),
                              (tq, "quantized_append", "quantized append")):
        def counted(*args, _run=getattr(module, name), _key=key, **kwargs):
            calls[_key] += 1
            return _run(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls
