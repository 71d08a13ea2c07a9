"""What a pass is: a named function from one compiled-model state to the next."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from kvcompile.arch import ArchSpec
from kvcompile.plan import Plan


@dataclass
class CompiledModel:
    """The model as the passes see it: weights, architecture and the plan they serve."""

    arch: ArchSpec
    config: Any
    state: dict[str, torch.Tensor]
    plan: Plan
    heads_permuted: bool = False  # full KV heads first in every layer
    attention: str = "eager"  # which attention the runtime installs
    log: list[str] = field(default_factory=list)  # one line per applied pass


class Pass(Protocol):
    name: str

    def apply(self, model: CompiledModel) -> CompiledModel: ...


def run_passes(model: CompiledModel, passes: Sequence[Pass]) -> CompiledModel:
    for compiler_pass in passes:
        model = compiler_pass.apply(model)
        model.log.append(compiler_pass.name)
    return model
