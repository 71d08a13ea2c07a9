"""The plan's file form (a mapping inside profiles and artifact manifests), read with checks.

Shared by the profile file (``kvcompile.profile.record``), the fit's settings
(``kvcompile.settings``) and the runtime's artifact reader, which must not import the
compiler's stages to load a plan.
"""
from __future__ import annotations

from typing import Any

from kvcompile.errors import ProfileError
from kvcompile.plan import BudgetLayout, HeadOrder, LayerPlan, Plan, Selection, Storage
from kvcompile.yamlio import FlowDict, FlowList


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    layers = []
    for index, layer in enumerate(plan.layers):
        layout = layer.layout
        layers.append(FlowDict(
            layer=index,
            full=FlowList(layer.full_heads),
            budgeted=FlowList(layer.budgeted_heads),
            sinks=layout.sinks if layout else 0,
            compensation=layout.compensation if layout else 0,
            selected=layout.selected if layout else 0,
            window=layout.window if layout else 0,
            sliding=layer.sliding,
        ))
        # written only when quantized: full-precision plans read and write as before
        if layer.full_storage.quantized:
            layers[-1]["full_storage"] = layer.full_storage.name
        if layer.budget_storage.quantized:
            layers[-1]["budget_storage"] = layer.budget_storage.name
    data: dict[str, Any] = {
        "policy": plan.policy,
        "selection": plan.selection.rule,
        "observation_window": plan.selection.observation_window,
        "layers": layers,
    }
    if plan.order is not HeadOrder.SOURCE:  # implied when absent: profiles, manifests unchanged
        data["order"] = plan.order.value
    return data


class Reader:
    """Reads a parsed YAML document and names the first bad field by its path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> ProfileError:
        return ProfileError(f"{self.source}: {path}: {message}")

    def mapping(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {type(value).__name__}")
        return value

    def get(self, parent: dict[str, Any], key: str, path: str, kind: type | tuple[type, ...]) -> Any:
        full = f"{path}.{key}" if path else key
        if key not in parent:
            raise self.fail(full, "missing")
        value = parent[key]
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise self.fail(full, f"expected a number, got {value!r}")
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(full, f"expected {names}, got {value!r}")
        return value

    def int_list(self, parent: dict[str, Any], key: str, path: str) -> tuple[int, ...]:
        values = self.get(parent, key, path, list)
        for i, v in enumerate(values):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise self.fail(f"{path}.{key}[{i}]", f"expected a non-negative integer, got {v!r}")
        return tuple(values)


def plan_from_dict(data: Any, reader: Reader, path: str = "plan",
                   order: HeadOrder = HeadOrder.SOURCE) -> Plan:
    """``order``: the head order the plan's context implies (profiles and artifact manifests
    hold source-order plans, written without the field); a plan stating another is refused."""
    data = reader.mapping(data, path)
    if "order" in data and (stated := reader.get(data, "order", path, str)) != order.value:
        raise reader.fail(f"{path}.order", f"expected {order.value!r} here, got {stated!r}; store the "
                                           f"plan in {order.value} order (Plan.to_{order.value})")
    layers_data = reader.get(data, "layers", path, list)
    layers = []
    for i, raw in enumerate(layers_data):
        p = f"{path}.layers[{i}]"
        raw = reader.mapping(raw, p)
        if reader.get(raw, "layer", p, int) != i:
            raise reader.fail(f"{p}.layer", f"expected {i} (layers in order)")
        full = reader.int_list(raw, "full", p)
        budgeted = reader.int_list(raw, "budgeted", p)
        ints = {k: reader.get(raw, k, p, int) for k in ("sinks", "compensation", "selected", "window")}
        sliding = reader.get(raw, "sliding", p, bool)
        storages = {}
        for key in ("full_storage", "budget_storage"):
            if key in raw:
                try:
                    storages[key] = Storage.parse(reader.get(raw, key, p, str))
                except ValueError as exc:
                    raise reader.fail(f"{p}.{key}", str(exc)) from exc
        try:
            layout = BudgetLayout(**ints) if budgeted else None
            layers.append(LayerPlan(full, budgeted, layout, sliding, **storages))
        except ValueError as exc:
            raise reader.fail(p, str(exc)) from exc
    try:
        return Plan(
            tuple(layers),
            policy=reader.get(data, "policy", path, str),
            selection=Selection(reader.get(data, "selection", path, str),
                                reader.get(data, "observation_window", path, int)),
            order=order,
        )
    except ValueError as exc:
        raise reader.fail(path, str(exc)) from exc
