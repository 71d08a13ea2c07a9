"""Turn head statistics into a plan under a memory target.

Memory is counted in bytes at the reference context (``kvcompile.memory.plan_bytes``): the
target is ``--kv-budget`` of the source model's cache in the baseline dtype
(``budget_bytes``), and the plan's storages (full precision or quantized codes, per head
group) decide what a slot costs. The fit itself spends *slot units*: one unit is one
budgeted slot at its mean cost under the requested storage, a full head costs its bytes in
units. :func:`fit` searches the largest unit budget whose plan's exact bytes fit the target,
so the plan never exceeds it whatever the storages (a quantized storage buys more slots).

Full heads are paid first, the rest goes to budgeted heads' layers by greedy marginal gain
along each layer's lower convex hull of an error curve: the local error curves (each layer's
error relative to its own residual norm, a proxy that over-ranks the first layer) blended
with the measured end-to-end answer loss of the layer (``sensitivity``), which finds the
layers that carry a near needle into the question. The result is shrunk toward an equal
split; the half-and-half mixes measured lower NLL and KL, and better needles, than either
extreme (docs/BENCHMARKS.md).
The settings, their defaults and their checks are ``kvcompile.settings.FitSettings``.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvcompile.arch import ArchSpec
from kvcompile.errors import BudgetError
from kvcompile.memory import (
    BASELINE_BYTES,
    BIAS_BYTES,
    budget_bytes,
    code_bytes,
    full_group_bytes,
    layer_bytes,
    plan_bytes,
    scale_groups,
    uncompressed_bytes,
)
from kvcompile.plan import FULL_STORAGE, BudgetLayout, LayerPlan, Plan, Storage
from kvcompile.settings import FitSettings

if TYPE_CHECKING:  # a type only: fitting needs no torch
    from kvcompile.profile.statistics import HeadStatistics

@dataclass
class FitResult:
    plan: Plan
    budget_slots: int  # the slot units the fit spent (the largest whose plan fits the bytes)
    used_slots: int  # KV slots of the plan at the reference context (``Plan.kv_slots``)
    full_rule: str  # how the number of full heads was decided, for the report
    demoted: list[tuple[int, int]] = field(default_factory=list)  # wanted full, did not fit
    notes: list[str] = field(default_factory=list)
    budget_bytes: int = 0  # the target: ``--kv-budget`` of the baseline cache, in bytes
    used_bytes: int = 0  # ``plan_bytes`` of the plan at the reference context


class _TooSmall(Exception):
    """A unit budget below the policy's smallest layout (the search's infeasible side)."""


def check_request(arch: ArchSpec, request: FitSettings) -> None:
    """Checks that need the model: run before calibrating so a bad target fails in seconds."""
    smallest = request.sinks + request.compensation + 1
    if request.at_context < smallest:
        raise BudgetError(
            f"--at-context {request.at_context} is smaller than the smallest budgeted layout "
            f"({smallest} slots: sinks + compensation + 1); pass a longer reference context"
        )
    if request.at_context > arch.max_context:
        raise BudgetError(
            f"--at-context {request.at_context} exceeds the model's maximum context "
            f"{arch.max_context}; pass --at-context {arch.max_context} or less"
        )
    # a target below the smallest layout of every head is refused here, before calibration
    # (minutes on a long context), not after it inside the fit
    target = budget_bytes(arch, request.at_context, request.kv_budget, request.bytes_per_value)
    smallest_layout = _smallest_layout(request)
    if _minimal_bytes(arch, request.at_context, smallest_layout, request.budget_storage,
                      request.bytes_per_value) > target:
        raise _refuse(arch, request, target, smallest_layout)


def fit(stats: HeadStatistics | None, arch: ArchSpec, request: FitSettings) -> FitResult:
    """Fit a plan with the requested policy; the baselines need no statistics.

    The plan's :func:`~kvcompile.memory.plan_bytes` at the reference context never exceeds
    :func:`~kvcompile.memory.budget_bytes`; a target below the policy's smallest layout is
    refused in one line naming the smallest feasible ``--kv-budget``.
    """
    check_request(arch, request)
    if request.policy == "profiled" and stats is None:
        raise BudgetError("the profiled policy needs head statistics")
    bpv = request.bytes_per_value
    ctx = request.at_context
    target = budget_bytes(arch, ctx, request.kv_budget, bpv)
    share = {"profiled": request.selected_fraction, "uniform": 0.0, "pyramid": 1.0}[request.policy]
    unit = unit_bytes(arch, request, share)
    fixed = math.ceil(_sliding_bytes(arch, ctx, bpv) / unit)
    full_cost = math.ceil(full_head_bytes(arch, request) / unit)

    def build(units: int) -> FitResult:
        if request.policy == "profiled":
            assert stats is not None
            return _fit_profiled(stats, arch, request, units, fixed, full_cost)
        return _fit_baseline(arch, request, units, fixed)

    smallest_layout = _smallest_layout(request)  # its bytes fit: check_request
    n_other = arch.n_kv_heads * sum(1 for w in arch.sliding_windows if not w)
    low = fixed + n_other * min(smallest_layout.capacity, ctx)
    high = fixed + n_other * max(ctx, full_cost)
    result = _largest_fitting(build, low, high, target, arch, ctx, bpv)
    if result is None:
        raise _refuse(arch, request, target, smallest_layout)
    result.budget_bytes = target
    return result


def _largest_fitting(build: Callable[[int], FitResult], low: int, high: int, target: int,
                     arch: ArchSpec, ctx: int, bpv: int) -> FitResult | None:
    """The plan of the largest unit budget in ``[low, high]`` whose bytes fit ``target``, by
    bisection (bytes grow with the units, up to the rounding of the layouts: every plan
    returned is checked, so the bytes fit even where they do not grow)."""

    def attempt(units: int) -> FitResult | None:
        try:
            result = build(units)
        except _TooSmall:
            return None
        result.used_bytes = plan_bytes(result.plan, arch, ctx, bpv)
        return result if result.used_bytes <= target else None

    best = attempt(low)
    if best is None:
        return None
    top = attempt(high)
    if top is not None:
        return top
    while high - low > 1:  # invariant: low fits, high does not
        middle = (low + high) // 2
        found = attempt(middle)
        if found is None:
            high = middle
        else:
            low, best = middle, found
    return best


def unit_bytes(arch: ArchSpec, request: FitSettings, selected_share: float) -> float:
    """Bytes of one budgeted slot, mean over a layout with ``selected_share`` of its slots
    selected: full precision with its float32 bias, or (quantized budget storage) codes with
    their scales for the selected share. The fit's unit of memory."""
    bpv = request.bytes_per_value
    fp = 2 * arch.head_dim * bpv + max(BIAS_BYTES, bpv)
    storage = request.budget_storage
    if not storage.quantized:
        return float(fp)
    return selected_share * quantized_token_bytes(storage, arch.head_dim) + (1 - selected_share) * fp


def quantized_token_bytes(storage: Storage, head_dim: int) -> float:
    """Bytes of one quantized token of one head: its codes, its values' scales and zeros, and
    its share of the keys' per-channel scales and zeros (one pair per ``group`` tokens)."""
    codes = code_bytes(head_dim, storage.key_bits) + code_bytes(head_dim, storage.value_bits)
    return codes + scale_groups(head_dim, storage.group) * 4 + head_dim * 4 / storage.group


def full_head_bytes(arch: ArchSpec, request: FitSettings) -> int:
    """Bytes of one full head at the reference context under the requested full storage."""
    return full_group_bytes(request.full_storage, 1, request.at_context, arch.head_dim,
                            request.bytes_per_value)


def _sliding_bytes(arch: ArchSpec, context: int, bpv: int) -> int:
    """Bytes of the model's own sliding-window layers, kept as the model runs them."""
    return sum(layer_bytes(_sliding_layer(arch, window), context, arch.head_dim, bpv)
               for window in arch.sliding_windows if window)


def _sliding_layer(arch: ArchSpec, window: int) -> LayerPlan:
    return LayerPlan((), tuple(range(arch.n_kv_heads)), BudgetLayout(0, 0, 0, window), True)


def _smallest_layout(request: FitSettings) -> BudgetLayout:
    """The policy's smallest budgeted layout: the profiled one at the minimum window, the
    baselines' sinks + one window slot."""
    if request.policy == "profiled":
        return request.layout(min(_min_capacity(request), request.at_context))
    return BudgetLayout(request.sinks, 0, 0, 1)


def _minimal_bytes(arch: ArchSpec, context: int, layout: BudgetLayout, storage: Storage, bpv: int) -> int:
    """Bytes of the plan that keeps every head of a non-sliding layer budgeted at ``layout``."""
    layer = LayerPlan((), tuple(range(arch.n_kv_heads)), layout, budget_storage=storage)
    n_other = sum(1 for w in arch.sliding_windows if not w)
    return _sliding_bytes(arch, context, bpv) + n_other * layer_bytes(layer, context, arch.head_dim, bpv)


def _min_capacity(request: FitSettings) -> int:
    return request.sinks + request.compensation + request.min_window


def smallest_budget(arch: ArchSpec, context: int, per_head: int | BudgetLayout,
                    storage: Storage = FULL_STORAGE, bytes_per_value: int = BASELINE_BYTES) -> float:
    """The smallest ``--kv-budget`` at ``context`` (4 decimals, rounded up) whose bytes hold
    every non-sliding KV head budgeted at ``per_head`` (a layout, or a capacity of full-precision
    slots) once the sliding layers hold their windows."""
    layout = per_head if isinstance(per_head, BudgetLayout) else BudgetLayout(0, 0, 0, min(per_head, context))
    needed = _minimal_bytes(arch, context, layout, storage, bytes_per_value)
    return math.ceil(needed / uncompressed_bytes(arch, context, bytes_per_value) * 1e4) / 1e4


def _refuse(arch: ArchSpec, request: FitSettings, target: int, layout: BudgetLayout) -> BudgetError:
    ctx = request.at_context
    bpv = request.bytes_per_value
    sliding = _sliding_bytes(arch, ctx, bpv)
    parts = [f"{layout.capacity} slots per KV head"]
    if request.budget_storage.quantized and layout.selected:
        parts[0] += f" ({layout.selected} selected as {request.budget_storage.name})"
    if sliding:
        parts.insert(0, f"{sliding} B for the sliding-window layers' own windows")
    smallest = smallest_budget(arch, ctx, layout, request.budget_storage, bpv)
    return BudgetError(
        f"--kv-budget {request.kv_budget:g} at {ctx} tokens ({target} B against the "
        f"{request.baseline_dtype} cache) is below the smallest layout ({' + '.join(parts)}); "
        f"the smallest feasible budget at {ctx} tokens is {smallest:g}"
    )


def _fit_profiled(stats: HeadStatistics, arch: ArchSpec, request: FitSettings, budget: int, fixed: int,
                  full_cost: int) -> FitResult:
    """The plan of ``budget`` slot units: ``fixed`` of them the sliding layers', ``full_cost``
    each full head's (a budgeted head costs its capacity)."""
    ctx = request.at_context
    cmin = min(_min_capacity(request), ctx)
    candidates = [(layer, head) for layer in range(arch.n_layers) if not arch.sliding_windows[layer]
                  for head in range(arch.n_kv_heads)]
    n_candidates = len(candidates)
    floor_cost = fixed + n_candidates * cmin
    if floor_cost > budget:
        raise _TooSmall
    scores = stats.retrieval
    ranked = sorted(candidates, key=lambda lh: (-float(scores[lh]), lh))
    best = max((float(scores[lh]) for lh in candidates), default=0.0)  # sliding heads can't be full
    if request.full_heads is not None:
        by = stats.needle if request.full_rank == "needle" else scores
        wanted = sorted(candidates, key=lambda lh: (-float(by[lh]), lh))[: request.full_heads]
        rule = f"--full-heads {request.full_heads} (set; heads in {request.full_rank}-score order)"
    else:
        threshold = request.retrieval_threshold * best
        wanted = [lh for lh in ranked if best > 0 and float(scores[lh]) >= threshold]
        rule = (f"retrieval score >= {request.retrieval_threshold:g} x best ({threshold:.4f}): "
                f"{len(wanted)} heads")
    # a full head costs (full_cost - floor) more than a budgeted head kept at the floor capacity;
    # the floor keeps local heads useful (an average window of ~128 tokens), so retrieval heads
    # cannot starve everything else at small budgets
    floor = min(max(cmin, request.min_budgeted_capacity), ctx)
    affordable = _affordable(budget - floor_cost, full_cost - cmin, len(wanted))
    if request.full_heads is None and full_cost > floor:  # else the floor protects nothing
        affordable = max(0, (budget - fixed - n_candidates * floor) // (full_cost - floor))
    # the user's count (--full-heads): only the hard minimum layout limits it
    full = wanted[:affordable]
    demoted = wanted[affordable:]
    notes = []
    if demoted:
        notes.append(
            f"{len(demoted)} heads above the retrieval threshold would leave the budgeted heads fewer "
            f"than {floor} slots on average and are budgeted: "
            f"{', '.join(f'L{layer}H{head}' for layer, head in demoted)}"
        )
    answer_weight = request.answer_weight
    reference = stats.layer_loss_full
    if stats.layer_loss is not None and reference and answer_weight > 0:
        # the answer loss was measured with these heads full; a plan that cannot keep them
        # has lost those answers anyway, and the curves say little about its windows
        kept = len(reference & set(full))
        if kept < len(reference):
            answer_weight *= kept / len(reference)
            notes.append(f"answer-loss weight {request.answer_weight:g} -> {answer_weight:.3g}: {kept} of the "
                         f"{len(reference)} heads full while it was measured are full here")
    budgeted, capacities = _allocation(stats, candidates, full, budget - fixed - len(full) * full_cost, cmin,
                                       ctx, request.equal_weight, answer_weight)
    layers = []
    for layer in range(arch.n_layers):
        window = arch.sliding_windows[layer]
        if window:
            layers.append(_sliding_layer(arch, window))
            continue
        heads = tuple(sorted(h for full_layer, h in full if full_layer == layer))
        rest = tuple(budgeted.get(layer, ()))
        layout = request.layout(capacities[layer]) if rest else None
        layers.append(LayerPlan(heads, rest, layout, full_storage=request.full_storage,
                                budget_storage=request.budget_storage))
    plan = Plan(tuple(layers), policy="profiled", selection=request.selection)
    return FitResult(plan, budget, plan.kv_slots(ctx), rule, demoted, notes)


def _affordable(spare: int, extra: int, wanted: int) -> int:
    """Full heads that ``spare`` units pay for at ``extra`` units each over a budgeted head
    (none, when a full head is no dearer, while the budgeted floor itself fits)."""
    if extra > 0:
        return max(0, spare // extra)
    return wanted if spare >= 0 else 0


def _allocation(stats: HeadStatistics, candidates: list[tuple[int, int]], full: list[tuple[int, int]],
                remaining: int, cmin: int, ctx: int, equal_weight: float = 0.0, answer_weight: float = 0.0,
                ) -> tuple[dict[int, list[int]], dict[int, int]]:
    """Capacities for everything not in ``full`` from the ``remaining`` slots once the full
    heads are paid; returns (budgeted, capacities)."""
    full_set = set(full)
    budgeted: dict[int, list[int]] = {}
    for layer, head in candidates:
        if (layer, head) not in full_set:
            budgeted.setdefault(layer, []).append(head)
    curves = _layer_curves(stats, budgeted, answer_weight)
    capacities = _greedy_capacities(curves, stats.capacity_grid, budgeted, remaining, cmin, ctx)
    if equal_weight > 0 and budgeted:
        capacities = _mix_with_equal(capacities, budgeted, remaining, cmin, ctx, equal_weight)
    return budgeted, capacities


def _mix_with_equal(capacities: dict[int, int], budgeted: dict[int, list[int]], remaining: int,
                    cmin: int, ctx: int, weight: float) -> dict[int, int]:
    """``(1 - weight) x capacities + weight x equal split``, rounded without exceeding the budget.

    Both allocations fit the budget and lie in [cmin, ctx], so their mix does too; the
    slots lost by rounding down go back one per head to the layers rounded down most.
    """
    n_budgeted = sum(len(heads) for heads in budgeted.values())
    equal = min(ctx, max(cmin, remaining // n_budgeted))
    exact = {layer: (1 - weight) * cap + weight * equal for layer, cap in capacities.items()}
    mixed = {layer: math.floor(value) for layer, value in exact.items()}
    left = remaining - sum(mixed[layer] * len(heads) for layer, heads in budgeted.items())
    for layer in sorted(mixed, key=lambda layer: (mixed[layer] - exact[layer], layer)):
        if len(budgeted[layer]) <= left and mixed[layer] < ctx:
            mixed[layer] += 1
            left -= len(budgeted[layer])
    return mixed


def _interp(curve: list[float], grid: tuple[int, ...], capacity: float, ctx: int) -> float:
    """``curve`` (one value per grid capacity) at ``capacity``: piecewise linear, zero at the context."""
    points = [(c, e) for c, e in zip(grid, curve, strict=True) if c < ctx] + [(ctx, 0.0)]
    if capacity <= points[0][0]:
        # below the grid: extrapolate flat (conservative: the smallest measured error)
        return points[0][1]
    for (c0, e0), (c1, e1) in zip(points, points[1:], strict=False):
        if capacity <= c1:
            return e0 + (e1 - e0) * (capacity - c0) / (c1 - c0)
    return 0.0


def _layer_curves(stats: HeadStatistics, budgeted: dict[int, list[int]], answer_weight: float,
                  ) -> dict[int, list[float]]:
    """What the greedy minimises per budgeted layer, one value per grid capacity.

    The local error curves summed over the layer's budgeted heads, blended with the layer's
    end-to-end answer-loss curve when the profile has one. Each part is divided by its total
    over the budgeted layers at the smallest capacity, so ``answer_weight`` is a share.
    """
    local = {layer: stats.error[layer, heads].sum(0).double() for layer, heads in budgeted.items()}
    loss = stats.layer_loss
    answer = {layer: loss[layer].double() for layer in budgeted} if loss is not None else {}
    answer_total = sum(float(curve[0]) for curve in answer.values())
    if answer_weight == 0 or answer_total <= 0:  # not measured, or no layer's cut changed the answers
        return {layer: curve.tolist() for layer, curve in local.items()}
    local_total = sum(float(curve[0]) for curve in local.values())
    local_weight = (1 - answer_weight) / local_total if local_total > 0 else 0.0
    return {layer: (local_weight * local[layer] + answer_weight / answer_total * answer[layer]).tolist()
            for layer in budgeted}


def _lower_hull(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Lower convex hull of (capacity, error) points sorted by capacity.

    An error curve can be flat and then drop (a needle 600 tokens back is lost until the
    window reaches it); a greedy walking the raw segments would stop at the flat part
    and never buy the drop. On the hull every step has a diminishing gain per slot.
    """
    hull: list[tuple[int, float]] = []
    for c, e in points:
        while len(hull) >= 2:
            (c0, e0), (c1, e1) = hull[-2], hull[-1]
            if (e1 - e0) * (c - c0) >= (e - e0) * (c1 - c0):  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append((c, e))
    return hull


def _greedy_capacities(
    curves: dict[int, list[float]], grid: tuple[int, ...], budgeted: dict[int, list[int]],
    remaining: int, cmin: int, ctx: int,
) -> dict[int, int]:
    """Largest error reduction per slot first, along each layer's lower convex hull."""
    capacities = {layer: cmin for layer in budgeted}
    remaining -= sum(cmin * len(heads) for heads in budgeted.values())
    capacity_points = sorted({c for c in grid if cmin < c < ctx} | {cmin, ctx})
    hulls = {layer: _lower_hull([(c, _interp(curve, grid, c, ctx)) for c in capacity_points])
             for layer, curve in curves.items()}

    def next_segment(layer: int) -> tuple[float, int, int] | None:
        current = capacities[layer]
        hull = hulls[layer]
        index = next((i for i, (c, _) in enumerate(hull) if c > current), None)
        if index is None:
            return None
        (c0, e0), (c1, e1) = hull[index - 1], hull[index]
        slope = (e0 - e1) / (c1 - c0)  # error removed per capacity step on this hull segment
        return (-slope / len(budgeted[layer]), layer, c1)

    heap = [seg for layer in budgeted if (seg := next_segment(layer)) is not None]
    heapq.heapify(heap)
    while heap and remaining > 0:
        _, layer, upper = heapq.heappop(heap)
        n = len(budgeted[layer])
        step = min(upper - capacities[layer], remaining // n)
        if step <= 0:
            continue  # cannot afford a single slot per head in this layer
        capacities[layer] += step
        remaining -= step * n
        if capacities[layer] == upper and (seg := next_segment(layer)) is not None:
            heapq.heappush(heap, seg)
    return capacities


def _fit_baseline(arch: ArchSpec, request: FitSettings, budget: int, fixed: int) -> FitResult:
    """``uniform``: StreamingLLM everywhere; ``pyramid``: PyramidKV's linear schedule, its
    selected slots in the requested budget storage (``uniform`` selects none)."""
    ctx = request.at_context
    layers_idx = [i for i in range(arch.n_layers) if not arch.sliding_windows[i]]
    n = arch.n_kv_heads
    sinks = request.sinks
    if budget < fixed or (layers_idx and (budget - fixed) // (n * len(layers_idx)) < sinks + 1):
        raise _TooSmall
    # a quantized storage's units can buy more than the context: no head holds more than it
    per_layer = min(ctx, (budget - fixed) // (n * len(layers_idx))) if layers_idx else 0
    if request.policy == "uniform":
        capacities = {i: per_layer for i in layers_idx}
        rule = "uniform: every head sinks + recent window (StreamingLLM)"
    else:
        capacities = _pyramid_schedule(layers_idx, per_layer, n, budget - fixed, ctx, sinks + 1)
        rule = "pyramid: PyramidKV arithmetic schedule (beta = 20), SnapKV selection"
    layers = []
    for i in range(arch.n_layers):
        window = arch.sliding_windows[i]
        if window:
            layers.append(_sliding_layer(arch, window))
            continue
        cap = capacities[i]
        if request.policy == "uniform":
            layers.append(LayerPlan((), tuple(range(n)), BudgetLayout(sinks, 0, 0, cap - sinks)))
        else:  # SnapKV keeps an observation window and selects the rest by attention
            window_slots = min(8, cap)
            layout = BudgetLayout(0, 0, cap - window_slots, window_slots)
            layers.append(LayerPlan((), tuple(range(n)), layout, budget_storage=request.budget_storage))
    # the baselines keep SnapKV's attention selection over a short observation window (the Plan
    # default) whatever the request says
    plan = Plan(tuple(layers), policy=request.policy)
    return FitResult(plan, budget, plan.kv_slots(ctx), rule)


def _pyramid_schedule(
    layers: list[int], average: int, n_heads: int, slots: int, ctx: int, floor: int, beta: int = 20
) -> dict[int, int]:
    """k_l falls linearly from k_max at the bottom to k_min at the top, total ~ L·k."""
    count = len(layers)
    k_min = max(floor, average // beta)
    k_max = 2 * average - k_min
    if k_max > ctx:
        k_max = ctx
        k_min = max(floor, 2 * average - k_max)
    step = (k_max - k_min) / max(1, count - 1)
    caps = {layer: int(round(k_max - i * step)) for i, layer in enumerate(layers)}
    # absorb rounding so the total never exceeds the budget
    while sum(caps.values()) * n_heads > slots:
        top = max(caps, key=lambda layer: caps[layer])
        caps[top] -= 1
    return caps


def error_at(stats: HeadStatistics, layer: int, head: int, capacity: int, ctx: int) -> float:
    """Interpolated error of one head, for reports and plots."""
    return _interp(stats.error[layer, head].tolist(), stats.capacity_grid, capacity, ctx)

