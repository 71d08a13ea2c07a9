"""The plan: which KV heads keep everything and what the others keep.

Small, frozen dataclasses shared by profile, fit, build and runtime; their file form (a
mapping inside profiles and artifact manifests) lives in ``kvcompile.plan_io``. A plan states
which head order its indices count (:class:`HeadOrder`), and :func:`head_rows` is the one
place a head order becomes tensor indices.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum

SELECTIONS = ("attention", "key_norm")


class HeadOrder(str, Enum):
    """What a plan's KV-head indices count.

    ``SOURCE``: the source checkpoint's heads. Profiles and artifact manifests hold plans in
    this order; the build permutes the weights by it (``LayerPlan.permutation``: full heads
    first), so the engine built from a plan serves it without reordering.
    ``SERVED``: positions in the weights an engine holds (:meth:`Plan.to_served`); such a plan
    is served through ``ReorderedCache``, which puts its full heads first at attention time.
    """

    SOURCE = "source"
    SERVED = "served"


def head_rows(kv_order: Sequence[int], heads_per_kv: int, head_dim: int = 1) -> tuple[int, ...]:
    """Indices along a head-major axis that put its KV heads in ``kv_order``.

    The axis holds, per KV head, ``heads_per_kv`` heads of ``head_dim`` entries each: with
    ``(group_size, head_dim)`` the rows of q_proj (columns of o_proj), with ``(1, head_dim)``
    the rows of k/v_proj, with ``head_dim`` 1 the heads of a ``[batch, heads, ...]`` tensor.
    The torch and ONNX head permutations and ``ReorderedCache`` all take their indices here.
    """
    return tuple((kv * heads_per_kv + j) * head_dim + d
                 for kv in kv_order for j in range(heads_per_kv) for d in range(head_dim))


@dataclass(frozen=True)
class Selection:
    """How budgeted heads pick their selected tokens when a prompt is compressed.

    The one home of these settings and their defaults: the fit's settings hold one and put it
    in the plan; the runtime's cache, the ONNX graphs and the answer-loss measurement read it
    from there.
    """

    rule: str = "attention"  # one of SELECTIONS
    # last prompt positions whose attention scores the keys ("attention"); 256 measured a lower
    # NLL but lost passkeys at 1/8 of the memory, so the default stays 16 (docs/BENCHMARKS.md)
    observation_window: int = 16

    def __post_init__(self) -> None:
        if self.rule not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.rule!r}")
        if self.observation_window < 1:
            raise ValueError(f"observation window must be >= 1, got {self.observation_window}")


STORAGE_BITS = (16, 8, 4, 2)
"""Bits per stored key or value: 16 is full precision (the cache's compute dtype, counted at
2 bytes against bf16), 8, 4 and 2 are codes with 16-bit scales and zero points."""


@dataclass(frozen=True)
class Storage:
    """How one head group stores its keys and values (docs/DESIGN.md, "Quantized storage").

    Full precision (16/16), or codes as KIVI lays them out: keys per channel over groups of
    ``group`` tokens, values per token over groups of ``group`` channels, an asymmetric
    ``x ≈ code * scale + zero`` with ``scale`` and ``zero`` in float16. Keys keep at least as
    many bits as values (their outlier channels make them the more fragile of the two).
    """

    key_bits: int = 16
    value_bits: int = 16
    group: int = 32

    def __post_init__(self) -> None:
        bits = (self.key_bits, self.value_bits)
        if any(b not in STORAGE_BITS for b in bits):
            raise ValueError(f"storage bits must be among {STORAGE_BITS}, got k{self.key_bits}"
                             f"v{self.value_bits}")
        if (16 in bits) and bits != (16, 16):
            raise ValueError(f"keys and values are both quantized or both full precision, got "
                             f"k{self.key_bits}v{self.value_bits}")
        if self.value_bits > self.key_bits:
            raise ValueError(f"keys need at least as many bits as values, got "
                             f"k{self.key_bits}v{self.value_bits}")
        if self.group < 2:
            raise ValueError(f"a quantization group needs at least 2 entries, got {self.group}")

    @property
    def quantized(self) -> bool:
        return self.key_bits < 16

    @property
    def name(self) -> str:
        """``full``, or ``k8v4g32`` style (the CLI's and the tables' spelling)."""
        return "full" if not self.quantized else f"k{self.key_bits}v{self.value_bits}g{self.group}"

    @classmethod
    def parse(cls, text: str) -> Storage:
        """The inverse of :attr:`name` (``g32`` may be left out)."""
        if text in ("full", "bf16", "k16v16"):
            return cls()
        match = re.fullmatch(r"k(\d+)v(\d+)(?:g(\d+))?", text)
        if not match:
            raise ValueError(f"storage must be 'full' or like 'k8v4g32', got {text!r}")
        key_bits, value_bits, group = match.groups()
        return cls(int(key_bits), int(value_bits), int(group) if group else cls.group)


FULL_STORAGE = Storage()


@dataclass(frozen=True)
class BudgetLayout:
    """Slots of one budgeted KV head: sinks + compensation + selected + ring window."""

    sinks: int
    compensation: int
    selected: int
    window: int

    def __post_init__(self) -> None:
        if min(self.sinks, self.selected, self.window) < 0 or self.compensation not in (0, 1):
            raise ValueError(f"invalid budget layout {self}")
        if self.window < 1:
            raise ValueError("a budgeted head needs a window of at least 1 (the current token)")

    @classmethod
    def split(cls, capacity: int, sinks: int, compensation: int, selected_fraction: float) -> BudgetLayout:
        """The layout of ``capacity`` slots: ``selected_fraction`` of the free ones by score."""
        free = capacity - sinks - compensation
        selected = int(round(selected_fraction * free))
        return cls(sinks, compensation, selected, free - selected)

    @property
    def capacity(self) -> int:
        return self.sinks + self.compensation + self.selected + self.window

    @property
    def token_slots(self) -> int:
        """Slots that hold real tokens (everything but the compensation slot)."""
        return self.sinks + self.selected + self.window


@dataclass(frozen=True)
class LayerPlan:
    """One layer: original KV-head indices kept full, the budgeted ones, and their layout."""

    full_heads: tuple[int, ...]
    budgeted_heads: tuple[int, ...]
    layout: BudgetLayout | None
    sliding: bool = False  # the source model runs this layer as sliding-window attention
    full_storage: Storage = FULL_STORAGE  # the full heads' body (a residual ring stays full)
    budget_storage: Storage = FULL_STORAGE  # the budgeted heads' selected slots (the rest stays full)

    def __post_init__(self) -> None:
        if self.budgeted_heads and self.layout is None:
            raise ValueError("budgeted heads need a layout")
        if set(self.full_heads) & set(self.budgeted_heads):
            raise ValueError("a head cannot be both full and budgeted")
        for storage in (self.full_storage, self.budget_storage):
            if not isinstance(storage, Storage):
                raise ValueError(f"storage must be a Storage, got {storage!r}")

    @property
    def n_heads(self) -> int:
        return len(self.full_heads) + len(self.budgeted_heads)

    @property
    def quantized_selected(self) -> bool:
        """The budgeted heads keep their selected slots as codes (the rest stays full); a
        sliding layer, kept as the model runs it, stays full precision."""
        return (bool(self.budgeted_heads) and self.budget_storage.quantized and not self.sliding
                and self.layout is not None and self.layout.selected > 0)

    @property
    def quantized_full(self) -> bool:
        return bool(self.full_heads) and self.full_storage.quantized

    @property
    def prefill_window(self) -> int:
        """The window of this layer's exact prefill attention: a sliding layer's ring (the
        model's own window, or the fit's shrunk one), 0 for full attention."""
        return self.layout.window if self.sliding and self.layout is not None else 0

    @property
    def permutation(self) -> tuple[int, ...]:
        """KV-head order after the permutation pass: full heads first."""
        return tuple(self.full_heads) + tuple(self.budgeted_heads)

    def kv_slots(self, context: int) -> int:
        """KV slots (tokens x heads) this layer allocates for ``context`` tokens (docs/DESIGN.md).

        A sliding layer's ring never needs more than ``context`` slots, as in transformers'
        static sliding cache (``kvcompile.memory``); budgeted layouts are fixed in size.
        """
        budgeted = 0
        if self.budgeted_heads:
            assert self.layout is not None
            capacity = min(self.layout.capacity, context) if self.sliding else self.layout.capacity
            budgeted = len(self.budgeted_heads) * capacity
        return len(self.full_heads) * context + budgeted


@dataclass(frozen=True)
class Plan:
    """Per-layer plan plus how budgeted heads pick their selected tokens."""

    layers: tuple[LayerPlan, ...]
    policy: str = "profiled"
    selection: Selection = Selection()
    order: HeadOrder = HeadOrder.SOURCE  # what the layers' head indices count

    def __post_init__(self) -> None:
        if not isinstance(self.selection, Selection):
            raise ValueError(f"selection must be a Selection, got {self.selection!r}")
        if self.order not in tuple(HeadOrder):
            raise ValueError(f"order must be one of {[o.value for o in HeadOrder]}, "
                             f"got {self.order!r}")
        object.__setattr__(self, "order", HeadOrder(self.order))

    @property
    def n_full(self) -> int:
        return sum(len(layer.full_heads) for layer in self.layers)

    def kv_slots(self, context: int) -> int:
        return sum(layer.kv_slots(context) for layer in self.layers)

    @property
    def quantized(self) -> bool:
        return any(layer.full_storage.quantized or layer.budget_storage.quantized
                   for layer in self.layers)

    def require_order(self, order: HeadOrder, use: str) -> None:
        """Refuse, in one line, a plan whose indices count another order than ``use`` needs."""
        if self.order is not order:
            raise ValueError(f"{use} needs a plan in {order.value} order, got one in "
                             f"{self.order.value} order; convert it with "
                             f"Plan.to_{order.value}(permuted_by=...)")

    def to_served(self, permuted_by: Plan | None) -> Plan:
        """This source-order plan with every head index replaced by that head's position in
        weights permuted by ``permuted_by`` (an artifact's own plan, in source order); ``None``:
        the source model's own, unpermuted weights, where the positions are the indices.

        Served there through ``ReorderedCache``, the result keeps each head in the cache slot
        this plan gives it on the source model, so it computes what this plan computes there.
        """
        self.require_order(HeadOrder.SOURCE, "Plan.to_served")
        return self._renumbered([{head: j for j, head in enumerate(order)}
                                 for order in self._weight_orders(permuted_by)], HeadOrder.SERVED)

    def to_source(self, permuted_by: Plan | None) -> Plan:
        """The inverse of :meth:`to_served`: this served-order plan in source indices."""
        self.require_order(HeadOrder.SERVED, "Plan.to_source")
        return self._renumbered([dict(enumerate(order))
                                 for order in self._weight_orders(permuted_by)], HeadOrder.SOURCE)

    def _weight_orders(self, permuted_by: Plan | None) -> list[tuple[int, ...]]:
        """Per layer, the source head at each position of the weights ``permuted_by`` made."""
        if permuted_by is None:
            return [tuple(range(layer.n_heads)) for layer in self.layers]
        permuted_by.require_order(HeadOrder.SOURCE, "permuted_by (the weights' own plan)")
        if len(permuted_by.layers) != len(self.layers):
            raise ValueError(f"the plan has {len(self.layers)} layers, the weights' plan "
                             f"{len(permuted_by.layers)}")
        return [layer.permutation for layer in permuted_by.layers]

    def _renumbered(self, maps: list[dict[int, int]], order: HeadOrder) -> Plan:
        layers = []
        for index, (layer, mapping) in enumerate(zip(self.layers, maps, strict=True)):
            if sorted(layer.permutation) != sorted(mapping):
                raise ValueError(f"plan layer {index} lists heads {sorted(layer.permutation)}, the "
                                 f"weights hold {sorted(mapping)}")
            layers.append(replace(layer, full_heads=tuple(mapping[h] for h in layer.full_heads),
                                  budgeted_heads=tuple(mapping[h] for h in layer.budgeted_heads)))
        return replace(self, layers=tuple(layers), order=order)

    @staticmethod
    def uncompressed(n_layers: int, n_kv_heads: int, sliding: tuple[int | None, ...] | None = None) -> Plan:
        """Every head full (sliding layers keep the model's own window)."""
        layers = []
        for i in range(n_layers):
            window = sliding[i] if sliding else None
            if window:
                layers.append(
                    LayerPlan((), tuple(range(n_kv_heads)), BudgetLayout(0, 0, 0, window), sliding=True)
                )
            else:
                layers.append(LayerPlan(tuple(range(n_kv_heads)), (), None))
        return Plan(tuple(layers), policy="uncompressed")
