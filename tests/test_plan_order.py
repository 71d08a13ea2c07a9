"""A plan states its head order (source or served): conversion, the one index helper, refusals."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from kvcompile.errors import ProfileError
from kvcompile.eval.evaluate import EvalConfig, evaluate_systems
from kvcompile.plan import BudgetLayout, HeadOrder, Plan, Selection, head_rows
from kvcompile.plan_io import Reader, plan_from_dict, plan_to_dict
from kvcompile.profile.record import load_profile
from kvcompile.runtime.engine import Engine
from kvcompile.runtime.head_order import ReorderedCache
from tests.test_passes import random_plan as random_passes_plan
from tests.tiny import tiny_loaded

SHIPPED = Path(__file__).resolve().parents[1] / "profiles" / "smollm2-135m-instruct.yaml"
LAYOUT = BudgetLayout(1, 1, 1, 2)


def random_plan(n_layers: int, n_kv: int, seed: int) -> Plan:
    """Random full heads per layer, both groups in a random (unsorted) order."""
    return random_passes_plan(n_layers, n_kv, seed, layout=LAYOUT, selection=Selection("key_norm"))


# ----------------------------------------------------------------- the one index helper


@pytest.mark.parametrize("group,head_dim", [(1, 1), (3, 1), (1, 4), (2, 5)])
def test_head_rows_equals_a_plain_torch_gather(group: int, head_dim: int) -> None:
    """Rows of an axis laid out [kv head, query head of its group, feature], kv heads reordered."""
    n_kv = 5
    axis = torch.arange(n_kv * group * head_dim).view(n_kv, group, head_dim)
    for seed in range(4):
        order = list(range(n_kv))
        random.Random(seed).shuffle(order)
        expected = axis[torch.tensor(order)].flatten().tolist()
        assert list(head_rows(order, group, head_dim)) == expected


# ----------------------------------------------------------------- conversion


@pytest.mark.parametrize("seed", range(6))
def test_source_served_source_roundtrips(seed: int) -> None:
    plan = random_plan(3, 5, seed)
    for weights in (random_plan(3, 5, 100 + seed), None):
        served = plan.to_served(permuted_by=weights)
        assert served.order is HeadOrder.SERVED and plan.order is HeadOrder.SOURCE
        assert served.to_source(permuted_by=weights) == plan
        assert served.to_source(permuted_by=weights).to_served(permuted_by=weights) == served
        assert (served.selection, served.policy) == (plan.selection, plan.policy)


@pytest.mark.parametrize("seed", range(4))
def test_served_indices_name_the_same_source_heads(seed: int) -> None:
    """Position p of weights permuted by W holds source head W.permutation[p] (the build's
    layout); a served plan's slot holds the head the source plan's slot holds."""
    plan, weights = random_plan(3, 6, seed), random_plan(3, 6, 50 + seed)
    served = plan.to_served(permuted_by=weights)
    for mine, theirs, built in zip(plan.layers, served.layers, weights.layers, strict=True):
        assert [built.permutation[p] for p in theirs.full_heads] == list(mine.full_heads)
        assert [built.permutation[p] for p in theirs.budgeted_heads] == list(mine.budgeted_heads)
        assert theirs.layout == mine.layout and theirs.sliding == mine.sliding


def test_an_artifacts_own_plan_is_the_identity_in_served_order() -> None:
    plan = random_plan(4, 6, 3)
    served = plan.to_served(permuted_by=plan)
    for layer in served.layers:
        assert layer.permutation == tuple(range(6))
    assert plan.to_served(permuted_by=None).layers == plan.layers  # unpermuted: same numbers


@pytest.mark.parametrize("make,message", [
    (lambda p: p.to_served(permuted_by=p).to_served(permuted_by=p), "needs a plan in source order"),
    (lambda p: p.to_source(permuted_by=p), "needs a plan in served order"),
    (lambda p: p.to_served(permuted_by=p.to_served(permuted_by=None)), "permuted_by"),
    (lambda p: p.to_served(permuted_by=random_plan(2, 4, 0)), "3 layers"),
    (lambda p: p.to_served(permuted_by=random_plan(3, 5, 0)), "lists heads"),
], ids=["served-to-served", "source-to-source", "served-weights", "layer-count", "head-count"])
def test_conversion_refuses_the_wrong_order_in_one_line(make, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        make(random_plan(3, 4, 1))
    assert "\n" not in str(info.value)


def test_order_is_checked_and_coerced() -> None:
    layers = random_plan(1, 2, 0).layers
    assert Plan(layers, order="served").order is HeadOrder.SERVED  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="order must be one of"):
        Plan(layers, order="permuted")  # type: ignore[arg-type]


# ----------------------------------------------------------------- where an order is expected


def test_reordered_cache_refuses_a_source_order_plan() -> None:
    loaded = tiny_loaded("llama", seed=0)
    plan = random_plan(loaded.arch.n_layers, loaded.arch.n_kv_heads, 2)
    engine = Engine(loaded.build(), plan, tokenizer=None, eos_token_ids=(0,))
    with pytest.raises(ValueError, match="ReorderedCache needs a plan in served order") as info:
        ReorderedCache(engine.allocate(1, 16), plan, loaded.arch.group_size)
    assert "\n" not in str(info.value)
    served = plan.to_served(permuted_by=None)
    cache = ReorderedCache(engine.allocate(1, 16, plan=served), served, loaded.arch.group_size)
    for layer, layer_plan in zip(cache.layers, plan.layers, strict=True):
        assert layer.kv_order.tolist() == list(layer_plan.permutation)


def test_eval_refuses_a_source_order_plan_the_weights_were_not_built_for() -> None:
    """Served as is, a foreign source-order plan would read the wrong heads (the old
    ``reorder=False`` mistake); the engine's own plan is fine."""
    loaded = tiny_loaded("llama", seed=0)
    own = random_plan(loaded.arch.n_layers, loaded.arch.n_kv_heads, 2)
    other = random_plan(loaded.arch.n_layers, loaded.arch.n_kv_heads, 5)
    assert [lp.permutation for lp in own.layers] != [lp.permutation for lp in other.layers]
    engine = Engine(loaded.build(), own, tokenizer=None, eos_token_ids=(0,))
    with pytest.raises(ValueError, match="'other' is in source order") as info:
        evaluate_systems(engine, {"other": other}, EvalConfig())
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------- the file form


def test_files_without_an_order_load_in_source_order_and_stay_unchanged() -> None:
    profile = load_profile(SHIPPED)
    assert profile.plan.order is HeadOrder.SOURCE
    assert "order" not in plan_to_dict(profile.plan)  # profiles and manifests are written as before


def test_a_served_plan_roundtrips_and_is_refused_where_a_source_plan_belongs() -> None:
    plan = random_plan(3, 4, 7)
    served = plan.to_served(permuted_by=plan)
    data = plan_to_dict(served)
    assert data["order"] == "served"
    assert plan_from_dict(data, Reader("test"), order=HeadOrder.SERVED) == served
    with pytest.raises(ProfileError, match=r"test: plan\.order: expected 'source'") as info:
        plan_from_dict(data, Reader("test"))
    assert "\n" not in str(info.value)
    assert plan_from_dict(plan_to_dict(plan), Reader("test")) == plan
