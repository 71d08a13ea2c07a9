"""Shared fixtures: the real SmolLM2 model is loaded once per test session."""
from __future__ import annotations

import pytest

from kvcompile.models import LoadedModel, load_model


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return load_model("default")


@pytest.fixture(scope="session")
def tokenizer(smollm2: LoadedModel):
    return smollm2.tokenizer
