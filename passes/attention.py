"""Install the budgeted attention: check the plan fits the model, then mark the swap.

The compact decoder hands every attention call to the runtime's cache, which calls only
the kvcompile custom ops; this pass is where the plan is checked against the weights it
will serve, so a mismatched profile fails at build time rather than at the first token.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from kvcompile.errors import ProfileError
from kvcompile.passes.base import CompiledModel, check_plan

ATTENTION_NAME = "kvcompile.budgeted_attention"


@dataclass(frozen=True)
class InstallBudgetedAttention:
    name: str = "install-budgeted-attention"

    def apply(self, model: CompiledModel) -> CompiledModel:
        if not model.heads_permuted:
            raise ProfileError("install-budgeted-attention needs permute-heads first (full heads first)")
        check_plan(model)
        return replace(model, attention=ATTENTION_NAME)
