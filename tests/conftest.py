"""Shared fixtures: the real SmolLM2 model is loaded once per test session."""
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
    from kvcompile.build.artifact import build_artifact
    from tests.test_profile_io import saved_tiny_model

    root = tmp_path_factory.mktemp("tiny-onnx")
    _, loaded, profile = saved_tiny_model(root)
    build_artifact(loaded, profile, root / "artifact", max_context=96)
    return root / "artifact"
