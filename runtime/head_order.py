"""Serve a served-order plan by reordering heads at attention time.

The artifact bakes its plan's head order into its weights; comparing several plans on one
model (bench/policies.py, the gate's broken variants) would otherwise need one weight copy
per plan. A plan in served order (``Plan.to_served``: its indices are positions in the
engine's weights) is served here: reordering q/k/v heads before the cache and the output
after it computes exactly what weights permuted for the plan compute.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvcompile.plan import HeadOrder, Plan, head_rows
from kvcompile.runtime.cache import LayerKV, StaticKVCache


def _orders(order: tuple[int, ...], group: int, device: torch.device
            ) -> tuple[Tensor, Tensor, Tensor]:
    """KV-head order, query-head order and its inverse, as index tensors."""
    kv = torch.tensor(head_rows(order, 1), dtype=torch.long, device=device)
    q = torch.tensor(head_rows(order, group), dtype=torch.long, device=device)
    return kv, q, torch.argsort(q)


@dataclass
class ReorderedLayer:
    inner: LayerKV
    kv_order: Tensor
    q_order: Tensor
    q_inverse: Tensor

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, *args) -> Tensor:
        out = self.inner.prefill(q[:, self.q_order], k[:, self.kv_order], v[:, self.kv_order], *args)
        return out[:, self.q_inverse]

    def store(self, q: Tensor, k: Tensor, v: Tensor, *args) -> None:
        self.inner.store(q[:, self.q_order], k[:, self.kv_order], v[:, self.kv_order], *args)

    def extend(self, q: Tensor, k: Tensor, v: Tensor, *args) -> Tensor:
        out = self.inner.extend(q[:, self.q_order], k[:, self.kv_order], v[:, self.kv_order], *args)
        return out[:, self.q_inverse]


class ReorderedCache:
    """A StaticKVCache whose served-order plan's full heads are put first on the fly.

    A source-order plan is refused: its indices count the source checkpoint's heads, which
    are the engine's positions only on unpermuted weights; ``plan.to_served(permuted_by=...)``
    says which weights the engine holds.
    """

    def __init__(self, cache: StaticKVCache, plan: Plan, group_size: int) -> None:
        plan.require_order(HeadOrder.SERVED, "ReorderedCache")
        self.cache = cache
        self.plan = plan
        self.layers = []
        for layer_plan, layer in zip(plan.layers, cache.layers, strict=True):
            kv, q, inverse = _orders(layer_plan.permutation, group_size, cache.device)
            self.layers.append(ReorderedLayer(layer, kv, q, inverse))

    def __getitem__(self, i: int) -> ReorderedLayer:
        return self.layers[i]

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def max_context(self) -> int:
        return self.cache.max_context

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def positions(self, n_new: int) -> Tensor:
        return self.cache.positions(n_new)

    def advance(self, n_new: int) -> None:
        self.cache.advance(n_new)

    def reset(self) -> None:
        self.cache.reset()
