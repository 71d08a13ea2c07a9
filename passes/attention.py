"""Install the budgeted attention: check the plan fits the model, then mark the swap.

The compact decoder hands every attention call to the runtime's cache, which calls only
the kvcompile custom ops; this pass is where the plan is checked against the weights it
will serve, so a mismatched profile fails at build time rather than at the first token.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from kvcompile.errors import ProfileError
from kvcompile.passes.base import CompiledModel

ATTENTION_NAME = "kvcompile.budgeted_attention"


def check_plan(model: CompiledModel) -> None:
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


@dataclass(frozen=True)
class InstallBudgetedAttention:
    name: str = "install-budgeted-attention"

    def apply(self, model: CompiledModel) -> CompiledModel:
        if not model.heads_permuted:
            raise ProfileError("install-budgeted-attention needs permute-heads first (full heads first)")
        check_plan(model)
        return replace(model, attention=ATTENTION_NAME)
