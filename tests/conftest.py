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
