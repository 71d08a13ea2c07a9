"""Serve a plan on an *unpermuted* model by reordering heads at attention time.

The artifact bakes the head order into its weights; comparing several plans on one
model (bench/policies.py, ``kvcompile eval`` baselines) would otherwise need one weight
copy per plan. Reordering q/k/v heads before the cache and the output after it computes
exactly what the permuted weights compute.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvcompile.plan import Plan
from kvcompile.runtime.cache import LayerKV, StaticKVCache


def _orders(order: tuple[int, ...], group: int, device: torch.device
            ) -> tuple[Tensor, Tensor, Tensor]:
    kv = torch.tensor(order, dtype=torch.long, device=device)
    q = torch.tensor([h * group + j for h in order for j in range(group)], dtype=torch.long,
                     device=device)
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
    """A StaticKVCache whose plan's full heads are put first on the fly."""

    def __init__(self, cache: StaticKVCache, plan: Plan, group_size: int) -> None:
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
