"""Torch compile (``compile_model``): the plan is checked against the model, then the head
permutation (same function, full heads first)."""
from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from kvcompile.arch import ArchSpec, arch_from_config
from kvcompile.errors import ProfileError
from kvcompile.passes import ATTENTION_NAME, PASSES, compile_model
from kvcompile.plan import BudgetLayout, HeadOrder, LayerPlan, Plan, Selection
from kvcompile.runtime.model import CompactLM
from tests.tiny import VOCAB, compact_logits, state_of, tiny_hf_model

LAYOUT = BudgetLayout(sinks=2, compensation=1, selected=1, window=4)


def random_plan(n_layers: int, n_kv: int, seed: int, layout: BudgetLayout = LAYOUT,
                selection: Selection = Selection()) -> Plan:
    """Random full heads per layer (possibly none or all), both groups in a random order."""
    rng = random.Random(seed)
    layers = []
    for _ in range(n_layers):
        heads = list(range(n_kv))
        rng.shuffle(heads)
        n_full = rng.randint(0, n_kv)
        full, budgeted = tuple(heads[:n_full]), tuple(heads[n_full:])
        layers.append(LayerPlan(full, budgeted, layout if budgeted else None))
    return Plan(tuple(layers), selection=selection)


def _double_model(family: str, seed: int) -> tuple[Any, ArchSpec, dict[str, torch.Tensor]]:
    hf = tiny_hf_model(family, seed=seed)
    state = {k: v.double() for k, v in state_of(hf).items()}
    return hf.config, arch_from_config(hf.config), state


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_permuted_model_computes_the_same_logits(family: str, seed: int) -> None:
    config, arch, state = _double_model(family, seed)
    plan = random_plan(arch.n_layers, arch.n_kv_heads, seed=100 + seed)
    assert any(layer.permutation != tuple(range(arch.n_kv_heads)) for layer in plan.layers)
    compiled = compile_model(arch, config, state, plan)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
    original = compact_logits(CompactLM.from_state_dict(arch, config, state), ids)
    permuted = compact_logits(CompactLM.from_state_dict(arch, config, compiled.state), ids)
    assert permuted.dtype == torch.float64
    torch.testing.assert_close(permuted, original, atol=1e-5, rtol=1e-5)


def test_permutation_is_not_a_no_op_guard() -> None:
    """Guard: permuting only k/v rows (not q/o) must break the function, so the test above can fail."""
    config, arch, state = _double_model("qwen2", 0)
    plan = Plan(tuple(LayerPlan((3, 1), (0, 2), LAYOUT) for _ in range(arch.n_layers)))
    compiled = compile_model(arch, config, state, plan)
    broken = dict(compiled.state)
    for i in range(arch.n_layers):
        for key in ("q_proj.weight", "q_proj.bias", "o_proj.weight"):
            name = f"model.layers.{i}.self_attn.{key}"
            broken[name] = state[name]
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    original = compact_logits(CompactLM.from_state_dict(arch, config, state), ids)
    wrong = compact_logits(CompactLM.from_state_dict(arch, config, broken), ids)
    assert (wrong - original).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_full_heads_rows_come_first(family: str) -> None:
    config, arch, state = _double_model(family, 3)
    plan = random_plan(arch.n_layers, arch.n_kv_heads, seed=7)
    new = compile_model(arch, config, state, plan).state
    d, g = arch.head_dim, arch.group_size
    for i, layer in enumerate(plan.layers):
        prefix = f"model.layers.{i}.self_attn."
        order = layer.full_heads + layer.budgeted_heads
        for slot, head in enumerate(order):
            for proj in ("k_proj", "v_proj"):
                for kind in ("weight", "bias") if arch.attention_bias else ("weight",):
                    after = new[f"{prefix}{proj}.{kind}"][slot * d:(slot + 1) * d]
                    before = state[f"{prefix}{proj}.{kind}"][head * d:(head + 1) * d]
                    assert torch.equal(after, before), (i, slot, head, proj, kind)
            # the KV head's query group moves with it: q rows and o_proj columns
            q_after = new[f"{prefix}q_proj.weight"][slot * g * d:(slot + 1) * g * d]
            q_before = state[f"{prefix}q_proj.weight"][head * g * d:(head + 1) * g * d]
            assert torch.equal(q_after, q_before)
            o_after = new[f"{prefix}o_proj.weight"][:, slot * g * d:(slot + 1) * g * d]
            o_before = state[f"{prefix}o_proj.weight"][:, head * g * d:(head + 1) * g * d]
            assert torch.equal(o_after, o_before)
    untouched = [k for k in state if "self_attn" not in k or "norm" in k]
    assert all(torch.equal(new[k], state[k]) for k in untouched)


def test_compile_does_not_mutate_its_input() -> None:
    config, arch, state = _double_model("llama", 0)
    before = {k: v.clone() for k, v in state.items()}
    plan = Plan(tuple(LayerPlan((2,), (0, 1, 3), LAYOUT) for _ in range(arch.n_layers)))
    compiled = compile_model(arch, config, state, plan)
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert not all(torch.equal(compiled.state[k], state[k]) for k in state)


def test_compiled_model_records_what_the_manifest_lists() -> None:
    """The manifest's ``attention`` and ``passes`` keep the values the pass objects set; the
    compiled model keeps the source-order plan the manifest records."""
    config, arch, state = _double_model("llama", 0)
    plan = random_plan(arch.n_layers, arch.n_kv_heads, seed=1)
    compiled = compile_model(arch, config, state, plan)
    assert ATTENTION_NAME == "kvcompile.budgeted_attention"
    assert PASSES == ("permute-heads", "install-budgeted-attention")
    assert compiled.plan is plan and compiled.plan.order is HeadOrder.SOURCE


# ----------------------------------------------------------------- compile refuses mismatches


def _compile(plan: Plan, family: str = "llama", **overrides):
    hf = tiny_hf_model(family, seed=0, **overrides)
    return compile_model(arch_from_config(hf.config), hf.config, state_of(hf), plan)


def _good_plan(n_layers: int = 2, n_kv: int = 4) -> Plan:
    """Last KV head full, the others budgeted: a real (non-identity) permutation."""
    return Plan(tuple(LayerPlan((n_kv - 1,), tuple(range(n_kv - 1)), LAYOUT) for _ in range(n_layers)))


def test_compile_refuses_a_served_order_plan() -> None:
    """A plan already rewritten for permuted weights would permute the source twice."""
    plan = _good_plan()
    for served in (plan.to_served(permuted_by=plan), plan.to_served(permuted_by=None)):
        with pytest.raises(ProfileError, match="served order") as info:
            _compile(served)
        assert "\n" not in str(info.value)


def test_compile_accepts_matching_plan() -> None:
    """The full head (3) moves to slot 0: k rows and the query group's o_proj columns."""
    hf = tiny_hf_model("llama", seed=0)
    arch, state = arch_from_config(hf.config), state_of(hf)
    compiled = _compile(_good_plan())
    d, g = arch.head_dim, arch.group_size
    key, out = "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(compiled.state[key][:d], state[key][3 * d:4 * d])
    assert torch.equal(compiled.state[out][:, :g * d], state[out][:, 3 * g * d:4 * g * d])


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (_good_plan(n_layers=3), "3 layers"),
        (_good_plan(n_kv=3), "each of the 4 KV heads"),
        (Plan(tuple(LayerPlan((0,), (1, 2, 2), LAYOUT) for _ in range(2))), "each of the 4 KV heads"),
        (Plan(tuple(LayerPlan((0,), (1, 2, 3), LAYOUT, sliding=True) for _ in range(2))), "sliding"),
    ],
    ids=["layer-count", "head-count", "duplicate-head", "sliding-flag"],
)
def test_compile_refuses_mismatched_plan(plan: Plan, message: str) -> None:
    with pytest.raises(ProfileError, match=message) as info:
        _compile(plan)
    assert "\n" not in str(info.value)


def test_compile_refuses_plan_without_sliding_flag_on_sliding_model() -> None:
    plan = Plan(tuple(LayerPlan((), (0, 1, 2, 3), BudgetLayout(0, 0, 0, 6)) for _ in range(2)))
    with pytest.raises(ProfileError, match="sliding"):
        _compile(plan, family="mistral")


def test_compile_refuses_sliding_layer_larger_than_its_window() -> None:
    wide = BudgetLayout(0, 0, 0, 7)
    plan = Plan(tuple(LayerPlan((), (0, 1, 2, 3), wide, sliding=True) for _ in range(2)))
    with pytest.raises(ProfileError, match="window 6"):
        _compile(plan, family="mistral")
    exact = Plan(tuple(LayerPlan((), (0, 1, 2, 3), BudgetLayout(0, 0, 0, 6), sliding=True)
                       for _ in range(2)))
    assert _compile(exact, family="mistral").plan is exact  # the window itself is accepted


@pytest.mark.parametrize("n_layers,n_kv", [(3, 4), (2, 5)], ids=["extra-layer", "extra-head"])
def test_compile_checks_the_plan_before_permuting(n_layers: int, n_kv: int) -> None:
    """A plan naming heads or layers the model lacks is a ProfileError, not an index error."""
    with pytest.raises(ProfileError):
        _compile(_good_plan(n_layers=n_layers, n_kv=n_kv))
