"""Head permutation: each layer's full KV heads (and their query groups) come first.

With the full heads contiguous, the runtime splits a layer's KV into two buffers by a
plain slice, no gather (DuoAttention's static layout). Only weights move: q/k/v rows and
o_proj columns, so the permuted model computes exactly the same function.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kvcompile.passes.base import CompiledModel, check_plan


def head_rows(kv_order: tuple[int, ...], heads_per_kv: int, head_dim: int) -> torch.Tensor:
    """Row indices of a projection whose heads are grouped per KV head, in ``kv_order``
    (also used by the ONNX pass that permutes the exported initializers)."""
    rows = []
    for kv in kv_order:
        for j in range(heads_per_kv):
            start = (kv * heads_per_kv + j) * head_dim
            rows.append(torch.arange(start, start + head_dim))
    return torch.cat(rows)


@dataclass(frozen=True)
class PermuteHeads:
    name: str = "permute-heads"

    def apply(self, model: CompiledModel) -> CompiledModel:
        if model.heads_permuted:
            return model
        check_plan(model)  # before touching weights: a bad plan must fail with a clear message
        arch = model.arch
        state = dict(model.state)
        for index, layer in enumerate(model.plan.layers):
            order = layer.permutation
            if order == tuple(range(arch.n_kv_heads)):
                continue
            prefix = f"model.layers.{index}.self_attn."
            q_rows = head_rows(order, arch.group_size, arch.head_dim)
            kv_rows = head_rows(order, 1, arch.head_dim)
            for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                for kind in ("weight", "bias"):
                    key = f"{prefix}{proj}.{kind}"
                    if key in state:
                        state[key] = state[key].index_select(0, rows).contiguous()
            o_key = f"{prefix}o_proj.weight"
            state[o_key] = state[o_key].index_select(1, q_rows).contiguous()
        return replace(model, state=state, heads_permuted=True)
