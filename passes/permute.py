"""Compile a model for a plan: check the plan fits it, then put each layer's full heads first.

With the full KV heads (and their query groups) contiguous, the runtime splits a layer's KV
into two buffers by a plain slice, no gather (DuoAttention's static layout). Only weights
move: q/k/v rows and o_proj columns, so the permuted model computes exactly the same
function. The plan is checked here, against the weights it will serve, so a mismatched
profile fails at build time rather than at the first token.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kvcompile.arch import ArchSpec
from kvcompile.errors import ProfileError
from kvcompile.plan import HeadOrder, Plan, head_rows

ATTENTION_NAME = "kvcompile.budgeted_attention"  # the attention the runtime installs (manifest)
PASSES = ("permute-heads", "install-budgeted-attention")  # the steps the manifest lists


@dataclass
class CompiledModel:
    """The source model's weights with the heads in ``plan``'s order: what an artifact stores.

    ``plan`` stays in source order (the manifest's plan); the weights hold its served order.
    Not frozen: the build casts ``state`` to the stored precision in place.
    """

    arch: ArchSpec
    config: Any
    state: dict[str, torch.Tensor]
    plan: Plan


def check_plan(arch: ArchSpec, plan: Plan) -> None:
    """The plan must be in source order and describe exactly this model's layers, heads and
    sliding layers."""
    if plan.order is not HeadOrder.SOURCE:
        raise ProfileError(f"the plan is in {plan.order.value} order (positions in permuted "
                           f"weights); compile the source model with the profile's source-order plan")
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


def compile_model(arch: ArchSpec, config: Any, state: Mapping[str, torch.Tensor],
                  plan: Plan) -> CompiledModel:
    """The source weights ``state`` (left untouched) permuted for the source-order ``plan``."""
    check_plan(arch, plan)  # before touching weights: a bad plan must fail with a clear message
    permuted = dict(state)
    for index, layer in enumerate(plan.layers):
        order = layer.permutation
        if order == tuple(range(arch.n_kv_heads)):
            continue
        prefix = f"model.layers.{index}.self_attn."
        q_rows = torch.tensor(head_rows(order, arch.group_size, arch.head_dim))
        kv_rows = torch.tensor(head_rows(order, 1, arch.head_dim))
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            for kind in ("weight", "bias"):
                key = f"{prefix}{proj}.{kind}"
                if key in permuted:
                    permuted[key] = permuted[key].index_select(0, rows).contiguous()
        o_key = f"{prefix}o_proj.weight"
        permuted[o_key] = permuted[o_key].index_select(1, q_rows).contiguous()
    return CompiledModel(arch, config, permuted, plan)
