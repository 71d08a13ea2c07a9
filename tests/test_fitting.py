"""Fitting a plan to a memory target from (synthetic) head statistics.

Budgets are counted in bytes at the reference context against the source model's bf16 cache;
the checks count a plan's bytes by ``kvcompile.memory.plan_bytes`` (itself checked against the
runtime's allocation in tests/test_memory.py) and its slots by hand, never trusting the fit's
own ``used_slots``/``used_bytes``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from kvcompile.arch import ArchSpec, arch_from_config
from kvcompile.errors import BudgetError
from kvcompile.fit.greedy import fit
from kvcompile.memory import plan_bytes, plan_memory_ratio
from kvcompile.plan import BudgetLayout, Plan, Selection, Storage
from kvcompile.profile.statistics import DEFAULT_GRID, HeadStatistics
from kvcompile.settings import POLICIES, FitSettings
from tests.tiny import tiny_config

CTX = 2048


def llama_arch(n_layers: int = 6, n_kv: int = 4, max_context: int = 4096) -> ArchSpec:
    return arch_from_config(tiny_config("llama", num_hidden_layers=n_layers, num_key_value_heads=n_kv,
                                        max_position_embeddings=max_context))


def gemma_arch(window: int = 128) -> ArchSpec:
    arch = arch_from_config(tiny_config("gemma3_text", sliding_window=window, max_position_embeddings=4096))
    assert arch.sliding_windows == (window, None, window, None)
    return arch


def make_stats(scores: torch.Tensor, error: torch.Tensor | None = None,
               grid: tuple[int, ...] = DEFAULT_GRID, seed: int = 0) -> HeadStatistics:
    """Statistics whose retrieval score is exactly ``scores / scores.max()``; random
    non-increasing error curves unless ``error`` is given."""
    if error is None:
        gen = torch.Generator().manual_seed(seed)
        steps = torch.rand(*scores.shape, len(grid), generator=gen)
        error = steps.flip(-1).cumsum(-1).flip(-1)  # positive, non-increasing in capacity
    zeros = torch.zeros_like(scores)
    return HeadStatistics(capacity_grid=grid, induction=scores, echo=scores, needle=scores,
                          sink_mass=zeros, local_mass=zeros, entropy=zeros, error=error)


def random_scores(arch: ArchSpec, seed: int) -> torch.Tensor:
    return torch.rand(arch.n_layers, arch.n_kv_heads, generator=torch.Generator().manual_seed(seed))


def slots_by_hand(plan: Plan, context: int) -> int:
    total = 0
    for layer in plan.layers:
        total += len(layer.full_heads) * context
        if layer.budgeted_heads:
            lay = layer.layout
            total += len(layer.budgeted_heads) * (lay.sinks + lay.compensation + lay.selected + lay.window)
    return total


def budget_bytes(arch: ArchSpec, kv_budget: float, context: int) -> int:
    """By hand: the bf16 cache is 2 bytes x (key + value) x head_dim per token of each KV head."""
    return math.floor(kv_budget * arch.n_layers * arch.n_kv_heads * context * 2 * arch.head_dim * 2)


def fp_slot_bytes(arch: ArchSpec) -> int:
    """A full-precision budgeted slot in bf16: key + value, and its float32 logit bias."""
    return 2 * arch.head_dim * 2 + 4


def kv_for_slots(arch: ArchSpec, slots: int, context: int) -> float:
    """The ``--kv-budget`` whose bytes hold ``slots`` full-precision budgeted slots (every layer
    budgeted: 4 int64 counters each) and not one more."""
    needed = slots * fp_slot_bytes(arch) + arch.n_layers * 4 * 8 + fp_slot_bytes(arch) // 2
    return needed / (arch.n_layers * arch.n_kv_heads * context * 2 * arch.head_dim * 2)


def full_set(plan: Plan) -> set[tuple[int, int]]:
    return {(i, h) for i, layer in enumerate(plan.layers) for h in layer.full_heads}


def check_plan_shape(plan: Plan, arch: ArchSpec) -> None:
    assert len(plan.layers) == arch.n_layers
    for layer in plan.layers:
        assert sorted(layer.full_heads + layer.budgeted_heads) == list(range(arch.n_kv_heads))


# ------------------------------------------------------------------- budget accounting


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kv_budget", [0.05, 0.125, 0.25, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_fit_meets_the_budget(policy: str, kv_budget: float, seed: int) -> None:
    """Never above the budget in bytes; below it only by the policy's granularity, in
    full-precision budgeted slots:

    * profiled: capacities move one slot per budgeted head of a layer, so less than
      ``n_kv_heads`` slots stay unused;
    * uniform: one capacity for every head of every layer, so less than one slot per head
      (``n_layers * n_kv_heads``);
    * pyramid: the uniform average, then one integer rounding per layer of the linear
      schedule: less than two slots per head (``2 * n_layers * n_kv_heads``).
    """
    arch = llama_arch()
    result = fit(make_stats(random_scores(arch, seed), seed=seed), arch,
                 FitSettings(kv_budget=kv_budget, at_context=CTX, policy=policy))
    budget = budget_bytes(arch, kv_budget, CTX)
    used = plan_bytes(result.plan, arch, CTX)
    check_plan_shape(result.plan, arch)
    assert result.budget_bytes == budget and result.used_bytes == used
    assert result.used_slots == slots_by_hand(result.plan, CTX) == result.plan.kv_slots(CTX)
    assert used <= budget
    slack = {"profiled": arch.n_kv_heads, "uniform": arch.n_kv_total, "pyramid": 2 * arch.n_kv_total}
    assert budget - used < slack[policy] * fp_slot_bytes(arch)
    assert plan_memory_ratio(result.plan, arch, CTX) <= kv_budget
    assert result.plan.policy == policy
    for layer in result.plan.layers:
        if layer.layout is not None:
            assert 1 <= layer.layout.capacity <= CTX


def test_profiled_layouts_use_request_settings() -> None:
    arch = llama_arch()
    request = FitSettings(kv_budget=0.125, at_context=CTX, sinks=2, compensation=1,
                         selected_fraction=0.5, min_window=8)
    result = fit(make_stats(random_scores(arch, 0)), arch, request)
    for layer in result.plan.layers:
        if layer.budgeted_heads:
            lay = layer.layout
            assert (lay.sinks, lay.compensation) == (2, 1)
            assert lay.capacity >= 2 + 1 + 8
            free = lay.capacity - 3
            assert lay.selected == round(0.5 * free) and lay.window == free - lay.selected


def test_pyramid_schedule_falls_with_depth() -> None:
    arch = llama_arch(n_layers=8)
    plan = fit(None, arch, FitSettings(kv_budget=0.125, at_context=CTX, policy="pyramid")).plan
    caps = [layer.layout.capacity for layer in plan.layers]
    assert all(a >= b for a, b in itertools.pairwise(caps)) and caps[0] > caps[-1]
    uniform = fit(None, arch, FitSettings(kv_budget=0.125, at_context=CTX, policy="uniform")).plan
    assert len({layer.layout.capacity for layer in uniform.layers}) == 1
    assert all(not layer.full_heads for layer in plan.layers + uniform.layers)


# ------------------------------------------------------------------- full heads


def test_full_heads_are_the_top_retrieval_heads_above_threshold() -> None:
    arch = llama_arch()
    scores = random_scores(arch, 3) * 0.4  # all below half of the best ...
    scores[1, 2], scores[4, 0], scores[5, 3] = 1.0, 0.8, 0.55  # ... except three
    result = fit(make_stats(scores), arch, FitSettings(kv_budget=0.25, at_context=CTX))
    assert full_set(result.plan) == {(1, 2), (4, 0), (5, 3)}
    assert result.demoted == [] and result.notes == []


@pytest.mark.parametrize("seed", range(4))
def test_full_heads_outrank_budgeted_heads(seed: int) -> None:
    arch = llama_arch()
    scores = random_scores(arch, seed)
    plan = fit(make_stats(scores), arch, FitSettings(kv_budget=0.25, at_context=CTX)).plan
    full = full_set(plan)
    assert full
    budgeted = {(i, h) for i in range(arch.n_layers) for h in range(arch.n_kv_heads)} - full
    assert min(float(scores[lh]) for lh in full) > max(float(scores[lh]) for lh in budgeted)


@pytest.mark.parametrize("count", [0, 1, 5])
def test_full_heads_override(count: int) -> None:
    arch = llama_arch()
    scores = random_scores(arch, 5)
    result = fit(make_stats(scores), arch, FitSettings(kv_budget=0.25, at_context=CTX, full_heads=count))
    ranked = sorted(((float(scores[i, h]), (i, h)) for i in range(arch.n_layers)
                     for h in range(arch.n_kv_heads)), reverse=True)
    assert full_set(result.plan) == {lh for _, lh in ranked[:count]}
    assert "--full-heads" in result.full_rule


def test_full_heads_that_do_not_fit_are_demoted_and_reported() -> None:
    arch = llama_arch()
    scores = 0.9 + 0.1 * random_scores(arch, 7)  # every head above the threshold
    request = FitSettings(kv_budget=0.25, at_context=CTX)
    result = fit(make_stats(scores), arch, request)
    budget = result.budget_slots  # in budgeted bf16 slots (key, value, bias)
    floor = min(max(request.sinks + request.compensation + request.min_window,
                    request.min_budgeted_capacity), CTX)
    # a full head holds CTX keys and values (and a length): that many budgeted slots, rounded up
    full_cost = math.ceil((CTX * 2 * arch.head_dim * 2 + 8) / fp_slot_bytes(arch))
    # each full head costs full_cost - floor more than the floor capacity every budgeted head keeps
    affordable = (budget - arch.n_kv_total * floor) // (full_cost - floor)
    assert 0 < affordable < arch.n_kv_total
    assert plan_bytes(result.plan, arch, CTX) <= budget_bytes(arch, 0.25, CTX)
    ranked = sorted(((i, h) for i in range(arch.n_layers) for h in range(arch.n_kv_heads)),
                    key=lambda lh: -float(scores[lh]))
    assert full_set(result.plan) == set(ranked[:affordable])
    assert result.demoted == ranked[affordable:]
    assert len(result.notes) == 1
    note = result.notes[0]
    assert f"{len(ranked) - affordable} heads" in note
    assert all(f"L{i}H{h}" in note for i, h in result.demoted)
    assert result.used_bytes == plan_bytes(result.plan, arch, CTX)


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize("policy", POLICIES)
def test_impossible_target_raises_one_line_budget_error(policy: str) -> None:
    arch = llama_arch()
    with pytest.raises(BudgetError, match="kv-budget") as info:
        fit(make_stats(random_scores(arch, 0)), arch, FitSettings(kv_budget=0.001, at_context=CTX, policy=policy))
    assert "\n" not in str(info.value)


def test_minimum_layout_boundary() -> None:
    """Exactly the minimum layout's bytes fit; one byte less does not."""
    arch = llama_arch(n_layers=2, n_kv=2)
    cmin = 4 + 1 + 16
    context = 1024
    stats = make_stats(torch.zeros(2, 2))
    minimum = 4 * cmin * fp_slot_bytes(arch) + 2 * 4 * 8  # 4 heads at cmin, 4 counters per layer
    total = 4 * context * 2 * arch.head_dim * 2
    result = fit(stats, arch, FitSettings(kv_budget=minimum / total, at_context=context))
    assert result.used_slots == 4 * cmin and result.used_bytes == minimum == result.budget_bytes
    with pytest.raises(BudgetError, match="smallest feasible budget"):
        fit(stats, arch, FitSettings(kv_budget=(minimum - 1) / total, at_context=context))


@pytest.mark.parametrize("kv_budget", [0.0, -0.25, 1.5])
def test_budget_outside_unit_interval_is_rejected(kv_budget: float) -> None:
    with pytest.raises(BudgetError, match="kv-budget"):
        FitSettings(kv_budget=kv_budget)


def test_whole_budget_is_accepted() -> None:
    arch = llama_arch(n_layers=2)
    result = fit(make_stats(random_scores(arch, 0)), arch, FitSettings(kv_budget=1.0, at_context=CTX))
    assert plan_bytes(result.plan, arch, CTX) <= result.budget_bytes == budget_bytes(arch, 1.0, CTX)
    assert result.used_slots <= arch.n_kv_total * CTX


@pytest.mark.parametrize("policy", POLICIES)
def test_context_beyond_model_maximum_is_rejected(policy: str) -> None:
    arch = llama_arch(max_context=4096)
    with pytest.raises(BudgetError, match="4096"):
        fit(make_stats(random_scores(arch, 0)), arch, FitSettings(at_context=4097, policy=policy))


@pytest.mark.parametrize("context", [4, 5, 8])
def test_tiny_reference_context_gives_a_plan_or_budget_error(context: int) -> None:
    """Whatever the context, the fit answers with a valid plan or a BudgetError, never a crash."""
    arch = llama_arch(n_layers=2)
    try:
        result = fit(make_stats(random_scores(arch, 0)), arch, FitSettings(kv_budget=1.0, at_context=context))
    except BudgetError:
        return
    assert result.used_slots == slots_by_hand(result.plan, context)
    assert plan_bytes(result.plan, arch, context) <= budget_bytes(arch, 1.0, context)


def test_profiled_policy_needs_statistics() -> None:
    with pytest.raises(BudgetError):
        fit(None, llama_arch(), FitSettings(at_context=CTX))


# ------------------------------------------------------------------- sliding-window layers


@pytest.mark.parametrize("policy", POLICIES)
def test_sliding_layers_keep_the_model_window_and_no_full_heads(policy: str) -> None:
    arch = gemma_arch(window=128)
    scores = torch.full((4, 4), 0.1)
    scores[0] = 1.0  # the sliding layers hold the best retrieval scores ...
    scores[2] = 0.9
    scores[1, 3] = 0.8  # ... and one full-attention head is close
    result = fit(make_stats(scores), arch, FitSettings(kv_budget=0.25, at_context=CTX, policy=policy))
    for i in (0, 2):
        layer = result.plan.layers[i]
        assert layer.sliding and layer.full_heads == ()
        assert layer.budgeted_heads == (0, 1, 2, 3)
        assert layer.layout == BudgetLayout(0, 0, 0, 128)
    for i in (1, 3):
        assert not result.plan.layers[i].sliding
    assert result.used_slots == slots_by_hand(result.plan, CTX)
    assert plan_bytes(result.plan, arch, CTX) <= budget_bytes(arch, 0.25, CTX)


def test_sliding_layers_never_full_even_when_forced() -> None:
    arch = gemma_arch()
    scores = torch.ones(4, 4)
    result = fit(make_stats(scores), arch, FitSettings(kv_budget=0.5, at_context=CTX, full_heads=16))
    assert all(i in (1, 3) for i, _ in full_set(result.plan))


# ------------------------------------------------------------------- greedy allocation


def interp(grid: tuple[int, ...], values: list[float], capacity: float, ctx: int) -> float:
    """Independent piecewise-linear error: flat below the grid, 0 at the context."""
    points = [(c, v) for c, v in zip(grid, values, strict=True) if c < ctx] + [(ctx, 0.0)]
    if capacity <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if capacity <= x1:
            return y0 + (y1 - y0) * (capacity - x0) / (x1 - x0)
    return 0.0


def test_greedy_prefers_the_layer_with_larger_error_reduction() -> None:
    arch = llama_arch(n_layers=2, n_kv=2)
    grid = (16, 32, 64, 128, 256)
    error = torch.zeros(2, 2, len(grid))
    error[0] = torch.tensor([0.8, 0.5, 0.3, 0.15, 0.05])  # steep
    error[1] = torch.tensor([0.08, 0.05, 0.03, 0.015, 0.005])  # ten times flatter
    request = FitSettings(kv_budget=0.1, at_context=512, equal_weight=0.0)
    plan = fit(make_stats(torch.zeros(2, 2), error, grid), arch, request).plan
    cap0, cap1 = plan.layers[0].layout.capacity, plan.layers[1].layout.capacity
    assert cap0 > cap1
    swapped = fit(make_stats(torch.zeros(2, 2), error.flip(0), grid), arch, request).plan
    assert swapped.layers[1].layout.capacity == cap0 and swapped.layers[0].layout.capacity == cap1


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kv_budget", [0.08, 0.2, 0.4])
def test_greedy_matches_brute_force_on_convex_curves(seed: int, kv_budget: float) -> None:
    """With convex decreasing curves, greedy marginal gain is optimal: compare it with an
    exhaustive search over every split of the budget between two layers."""
    arch = llama_arch(n_layers=2, n_kv=2)
    ctx = 512
    grid = (16, 32, 64, 128, 256)
    gen = torch.Generator().manual_seed(seed)
    error = torch.zeros(2, 2, len(grid))
    for layer in range(2):
        for head in range(2):
            a, p = 0.5 + torch.rand(1, generator=gen).item(), 1 + 2 * torch.rand(1, generator=gen).item()
            error[layer, head] = torch.tensor([a * (1 - c / ctx) ** p for c in grid])
    request = FitSettings(kv_budget=kv_budget, at_context=ctx, equal_weight=0.0)
    result = fit(make_stats(torch.zeros(2, 2), error, grid), arch, request)
    caps = [layer.layout.capacity for layer in result.plan.layers]
    curves = [[float(error[layer, :, i].sum()) for i in range(len(grid))] for layer in range(2)]

    def total(c0: int, c1: int) -> float:
        return interp(grid, curves[0], c0, ctx) + interp(grid, curves[1], c1, ctx)

    cmin = request.sinks + request.compensation + request.min_window
    per_head = result.budget_slots // 2  # two heads per layer, every head budgeted
    best = min(total(c0, min(ctx, per_head - c0)) for c0 in range(cmin, min(ctx, per_head - cmin) + 1))
    assert total(*caps) <= best + 1e-9
    assert sum(caps) * 2 <= result.budget_slots


@pytest.mark.parametrize("weight", [0.25, 0.5, 1.0])
def test_equal_weight_mixes_greedy_and_equal_split(weight: float) -> None:
    """Capacities are (1 - w) x the pure greedy ones + w x the equal split, rounded down and
    topped up one slot per head while the budget allows; w = 1 gives every layer the same."""
    arch = llama_arch(n_layers=2, n_kv=2)
    grid = (16, 32, 64, 128, 256)
    error = torch.zeros(2, 2, len(grid))
    error[0] = torch.tensor([0.8, 0.5, 0.3, 0.15, 0.05])
    error[1] = torch.tensor([0.08, 0.05, 0.03, 0.015, 0.005])
    stats = make_stats(torch.zeros(2, 2), error, grid)
    greedy = fit(stats, arch, FitSettings(kv_budget=0.1, at_context=512, equal_weight=0.0))
    mixed = fit(stats, arch, FitSettings(kv_budget=0.1, at_context=512, equal_weight=weight))
    g = [layer.layout.capacity for layer in greedy.plan.layers]
    m = [layer.layout.capacity for layer in mixed.plan.layers]
    assert g[0] > g[1]  # the steep layer gets more under pure greedy
    equal = mixed.budget_slots // 4  # four budgeted heads, no full ones
    exact = [(1 - weight) * c + weight * equal for c in g]
    assert all(math.floor(x) <= c <= math.floor(x) + 1 for x, c in zip(exact, m, strict=True))
    assert mixed.used_slots <= mixed.budget_slots
    assert mixed.budget_slots - mixed.used_slots < 2 * 2  # at most one round of two heads left
    if weight == 1.0:
        assert m[0] == m[1] == equal
    else:
        assert g[0] > m[0] >= m[1] > g[1]


def test_equal_weight_out_of_range_is_a_budget_error() -> None:
    with pytest.raises(BudgetError, match="--equal-weight"):
        FitSettings(equal_weight=1.5)


# ------------------------------------------------------- hull and end-to-end answer loss


def test_lower_hull_drops_points_above_the_chord() -> None:
    from kvcompile.fit.greedy import _lower_hull

    assert _lower_hull([(16, 1.0), (32, 1.0), (64, 0.9), (128, 0.0)]) == [(16, 1.0), (128, 0.0)]
    convex = [(16, 1.0), (32, 0.5), (64, 0.25), (128, 0.0)]
    assert _lower_hull(convex) == convex
    # a point exactly on the chord adds nothing and is dropped
    assert _lower_hull([(0, 2.0), (10, 1.0), (20, 0.0)]) == [(0, 2.0), (20, 0.0)]


def test_greedy_buys_a_drop_behind_a_flat_stretch() -> None:
    """Layer 0 loses everything until its window reaches 256 tokens (a needle that far back);
    walking the raw segments never pays for the flat part, the hull does. Hand-computed:
    floors 21, layer 1 first to 32 (best gain per slot), then layer 0's whole hull segment to
    256 (470 slots), then layer 1 takes the 38 slots left: 32 + 19 = 51."""
    arch = llama_arch(n_layers=2, n_kv=2)
    ctx = 512
    grid = (16, 32, 64, 128, 256)
    error = torch.zeros(2, 2, len(grid))
    error[0] = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    error[1] = torch.tensor([0.3, 0.2, 0.1, 0.05, 0.02])
    request = FitSettings(kv_budget=kv_for_slots(arch, 614, ctx), at_context=ctx, equal_weight=0.0)
    result = fit(make_stats(torch.zeros(2, 2), error, grid), arch, request)
    assert result.used_slots == 614
    assert [layer.layout.capacity for layer in result.plan.layers] == [256, 51]


def answer_stats(answer_loss: torch.Tensor) -> HeadStatistics:
    """Two layers, two heads: layer 0 has the steeper local curves, layer 1 the answer loss."""
    grid = (16, 32, 64, 128, 256)
    error = torch.zeros(2, 2, len(grid))
    error[0] = torch.tensor([0.8, 0.5, 0.3, 0.15, 0.05])
    error[1] = torch.tensor([0.08, 0.05, 0.03, 0.015, 0.005])
    stats = make_stats(torch.zeros(2, 2), error, grid)
    stats.layer_loss = answer_loss
    return stats


ANSWER_LOSS = torch.tensor([[0.1, 0.1, 0.1, 0.1, 0.1], [0.4, 0.4, 0.4, 0.4, 0.0]])


def test_answer_loss_blend_is_a_share_of_each_normalised_part() -> None:
    from kvcompile.fit.greedy import _layer_curves

    stats = answer_stats(ANSWER_LOSS)
    budgeted = {0: [0, 1], 1: [0, 1]}
    curves = _layer_curves(stats, budgeted, 0.25)
    local_total = 2 * 0.8 + 2 * 0.08  # both layers' head sums at the smallest capacity
    answer_total = 0.1 + 0.4
    for layer in range(2):
        for i in range(5):
            local = 2 * float(stats.error[layer, 0, i])
            expected = 0.75 * local / local_total + 0.25 * float(ANSWER_LOSS[layer, i]) / answer_total
            assert curves[layer][i] == pytest.approx(expected)
    assert _layer_curves(stats, budgeted, 0.0)[1] == pytest.approx([2 * float(x) for x in stats.error[1, 0]])


def test_answer_weight_moves_slots_to_the_layer_the_answers_need() -> None:
    arch = llama_arch(n_layers=2, n_kv=2)

    def capacities(stats: HeadStatistics, weight: float) -> list[int]:
        request = FitSettings(kv_budget=kv_for_slots(arch, 614, 512), at_context=512, equal_weight=0.0,
                              answer_weight=weight)
        return [layer.layout.capacity for layer in fit(stats, arch, request).plan.layers]

    local_only = capacities(answer_stats(ANSWER_LOSS), 0.0)
    assert local_only[0] > local_only[1]
    answers = capacities(answer_stats(ANSWER_LOSS), 1.0)
    assert answers[1] >= 256 > local_only[1]  # the whole drop at 256 is bought
    # no measured answer loss (an old profile): the weight changes nothing
    assert capacities(answer_stats(None), 0.5) == local_only
    assert capacities(answer_stats(torch.zeros(2, 5)), 0.5) == local_only


def test_answer_weight_out_of_range_is_a_budget_error() -> None:
    with pytest.raises(BudgetError, match="--answer-weight"):
        FitSettings(answer_weight=-0.1)


def test_answer_weight_shrinks_with_the_reference_full_heads_the_plan_drops() -> None:
    """The answer loss holds for plans that keep the heads full while it was measured."""
    arch = llama_arch(n_layers=2, n_kv=2)
    grid = (16, 32, 64, 128, 256)
    scores = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # L0H0 is the retrieval head
    error = answer_stats(ANSWER_LOSS).error

    def stats(reference: frozenset[tuple[int, int]]) -> HeadStatistics:
        result = make_stats(scores, error, grid)
        result.layer_loss, result.layer_loss_full = ANSWER_LOSS, reference
        return result

    def run(reference: frozenset[tuple[int, int]], full_heads: int, weight: float = 1.0):
        request = FitSettings(kv_budget=0.3, at_context=512, equal_weight=0.0, answer_weight=weight,
                             full_heads=full_heads)
        return fit(stats(reference), arch, request)

    kept = run(frozenset({(0, 0)}), full_heads=1)
    assert kept.plan == run(frozenset(), full_heads=1).plan and not kept.notes
    dropped = run(frozenset({(0, 0)}), full_heads=0)
    assert dropped.plan == run(frozenset({(0, 0)}), full_heads=0, weight=0.0).plan
    assert dropped.plan != run(frozenset(), full_heads=0).plan
    assert dropped.notes == ["answer-loss weight 1 -> 0: 0 of the 1 heads full while it was measured are full here"]
    half = run(frozenset({(0, 0), (1, 1)}), full_heads=1)
    assert half.plan == run(frozenset(), full_heads=1, weight=0.5).plan


def test_profiled_plan_selects_with_the_requested_observation_window() -> None:
    """The profiled plan scores selected tokens over the request's window; the baselines keep SnapKV's."""
    arch = llama_arch()
    stats = make_stats(torch.rand(arch.n_layers, arch.n_kv_heads, generator=torch.Generator().manual_seed(2)))
    for window in (8, 300):
        request = FitSettings(kv_budget=0.3, at_context=512).with_values(observation_window=window)
        assert fit(stats, arch, request).plan.selection == Selection("attention", window)
        for policy in ("uniform", "pyramid"):
            baseline = fit(None, arch, replace(request, policy=policy)).plan
            assert baseline.selection == Plan(()).selection == Selection()
    with pytest.raises(BudgetError, match="--observation-window"):
        FitSettings().with_values(observation_window=0)


# ------------------------------------------------------------------- bytes and storages

STORAGES = ("full", "k8v8", "k8v4", "k4v4", "k4v2", "k2v2", "k8v4g16")


@hyp_settings(max_examples=60, deadline=None)
@given(kv_budget=st.floats(0.02, 1.0), policy=st.sampled_from(POLICIES),
       full=st.sampled_from(STORAGES), budgeted=st.sampled_from(STORAGES),
       dtype=st.sampled_from(["bfloat16", "float32"]), context=st.sampled_from([256, 1000, 2048]),
       seed=st.integers(0, 3), gemma=st.booleans())
def test_plan_bytes_never_exceed_the_byte_budget(kv_budget: float, policy: str, full: str, budgeted: str,
                                                  dtype: str, context: int, seed: int, gemma: bool) -> None:
    """Whatever the budget, storages, baseline dtype and model: a plan within the bytes (counted
    by hand for the target) with the requested storages, or a one-line refusal."""
    arch = gemma_arch() if gemma else llama_arch()
    request = FitSettings(kv_budget=kv_budget, at_context=context, policy=policy, baseline_dtype=dtype,
                          full_storage=Storage.parse(full), budget_storage=Storage.parse(budgeted))
    try:
        result = fit(make_stats(random_scores(arch, seed), seed=seed), arch, request)
    except BudgetError as err:
        assert "\n" not in str(err) and "smallest feasible budget" in str(err)
        return
    bpv = {"bfloat16": 2, "float32": 4}[dtype]
    target = math.floor(kv_budget * sum(arch.n_kv_heads * (min(w, context) if w else context)
                                        for w in arch.sliding_windows) * 2 * arch.head_dim * bpv)
    assert plan_bytes(result.plan, arch, context, bpv) <= target == result.budget_bytes
    check_plan_shape(result.plan, arch)
    for layer in result.plan.layers:
        if layer.sliding:
            assert not layer.full_storage.quantized and not layer.budget_storage.quantized
            continue
        if layer.full_heads:
            assert layer.full_storage == request.full_storage
        if policy != "uniform" and layer.budgeted_heads:  # uniform selects nothing to quantize
            assert layer.budget_storage == request.budget_storage
        if layer.layout is not None:
            assert layer.layout.capacity <= context


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("storage", ["k8v8", "k4v4", "k4v2"])
def test_quantized_storage_buys_more_slots_at_the_same_bytes(policy: str, storage: str) -> None:
    """Codes are cheaper than bf16 values: at the same byte budget the quantized plan holds more
    tokens, and its bytes still fit. (``uniform`` selects no token, so it quantizes nothing.)"""
    arch = llama_arch()
    stats = make_stats(random_scores(arch, 0))
    base = FitSettings(kv_budget=0.125, at_context=CTX, policy=policy)
    plain = fit(stats, arch, base)
    quantized = fit(stats, arch, base.with_values(full_storage=storage, budget_storage=storage))
    budget = budget_bytes(arch, 0.125, CTX)
    assert plan_bytes(quantized.plan, arch, CTX) <= budget and plan_bytes(plain.plan, arch, CTX) <= budget
    if policy == "uniform":
        assert quantized.plan == plain.plan
    else:
        assert quantized.plan.kv_slots(CTX) > 1.3 * plain.plan.kv_slots(CTX)


def test_quantized_full_heads_are_cheaper_to_keep() -> None:
    """A full head in 4-bit codes costs about a quarter of a bf16 one, so a budget that
    demotes most wanted heads in bf16 keeps more of them full when they are quantized."""
    arch = llama_arch()
    stats = make_stats(0.9 + 0.1 * random_scores(arch, 7))  # every head above the threshold
    base = FitSettings(kv_budget=0.25, at_context=CTX)
    plain = fit(stats, arch, base)
    quantized = fit(stats, arch, base.with_values(full_storage="k4v4"))
    assert quantized.plan.n_full > plain.plan.n_full > 0
    assert plan_bytes(quantized.plan, arch, CTX) <= budget_bytes(arch, 0.25, CTX)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("storage", ["full", "k4v2"])
def test_smallest_feasible_budget_is_the_boundary_in_bytes(policy: str, storage: str) -> None:
    """The refusal names a budget that fits; 2e-4 less is refused again, in one line."""
    import re

    arch = gemma_arch()
    stats = make_stats(random_scores(arch, 0))
    request = FitSettings(kv_budget=0.001, at_context=CTX, policy=policy).with_values(budget_storage=storage)
    with pytest.raises(BudgetError) as caught:
        fit(stats, arch, request)
    message = str(caught.value)
    assert "\n" not in message and "bfloat16" in message
    smallest = float(re.search(r"smallest feasible budget at 2048 tokens is ([0-9.]+)$", message).group(1))
    result = fit(stats, arch, replace(request, kv_budget=smallest))
    assert plan_bytes(result.plan, arch, CTX) <= budget_bytes(arch, smallest, CTX)
    with pytest.raises(BudgetError, match="smallest feasible budget"):
        fit(stats, arch, replace(request, kv_budget=smallest - 2e-4))


def test_float32_baseline_counts_the_same_ratio_in_twice_the_bytes() -> None:
    """``--baseline-dtype float32`` doubles both sides (the biases and counters do not double,
    so the plan is a little larger, never a little over)."""
    arch = llama_arch()
    stats = make_stats(random_scores(arch, 0))
    bf16 = fit(stats, arch, FitSettings(kv_budget=0.125, at_context=CTX))
    fp32 = fit(stats, arch, FitSettings(kv_budget=0.125, at_context=CTX, baseline_dtype="float32"))
    assert fp32.budget_bytes == 2 * bf16.budget_bytes
    assert plan_bytes(fp32.plan, arch, CTX, 4) <= fp32.budget_bytes
    assert fp32.plan.kv_slots(CTX) >= bf16.plan.kv_slots(CTX)
    with pytest.raises(BudgetError, match="--baseline-dtype must be one of"):
        FitSettings(baseline_dtype="int8")
