"""The static-budget runtime: budgeted cache, custom ops, generation loop.

``kvcompile.runtime.load(DIR)`` returns an :class:`Engine` for a built artifact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def load(directory: str | Path, verify: bool = True, max_context: int | None = None) -> Any:
    """Load a verified artifact and return its Engine (``engine.generate(prompt, ...)``)."""
    from kvcompile.artifact import load_engine

    return load_engine(Path(directory), verify=verify, max_context=max_context)


__all__ = ["load"]
