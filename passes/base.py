"""What a pass is: a named function from one compiled-model state to the next."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from kvcompile.arch import ArchSpec
from kvcompile.errors import ProfileError
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


def check_plan(model: CompiledModel) -> None:
    """The plan must describe exactly this model's layers, heads and sliding layers."""
    arch = model.arch
    plan = model.plan
    if len(plan.layers) != arch.n_layers:
        raise ProfileError(f"the plan has {len(plan.layers)} layers, the model {arch.n_layers}")
    for index, layer in enumerate(plan.layers):
        if sorted(layer.permutation) != list(range(arch.n_kv_heads)):
            raise ProfileError(f"plan layer {index} does not list each of the {arch.n_kv_heads} KV heads once")
        window = arch.sliding_windows[index]
        if bool(window) != layer.sliding:
            raise ProfileError(f"plan layer {index}: sliding={layer.sliding} but the model's layer is "
                               f"{'sliding-window' if window else 'full'} attention")
        if window and layer.layout is not None and layer.layout.capacity > window:
            raise ProfileError(f"plan layer {index} gives a sliding layer more than its window {window}")
