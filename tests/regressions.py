"""Deliberately broken plans: the regressions a gate must be shown to catch.

A gate that passes the shipped artifact is evidence only if it fails on plans that are
broken in the ways a real bug or a bad fit would break them. Each plan here is derived
from a profile at call time (never from hard-coded numbers), so the check keeps working
when the profile is refitted:

- ``uniform``: StreamingLLM windows everywhere, with the KV bytes the shipped plan
  allocates at the eval context (not at the profile's reference context, where the two
  plans would differ at every shorter length);
- ``refit 1/32``: the profile's own fit settings at a quarter of its 1/8 budget (at half,
  1/16, the quantized shipped plan measured as well as at 1/8 on the CI cases: no regression);
- ``lowest-scoring full``: the fit run with its head ranking (retrieval score or needle mass,
  as the shipped settings rank) reversed, so the full heads are the ones the profiler scored
  lowest (a profiler bug), same count;
- ``sinks + 32``: the shipped full heads kept, every budgeted head cut to its sinks and a
  32-token window.

The plans are in source order (the source model's KV-head indices). ``Plan.to_served``
rewrites one for an artifact whose weights are already permuted, so it can be served on the
artifact's engine next to the artifact's own plan (``evaluate_with_regressions``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from kvcompile.arch import ArchSpec
from kvcompile.errors import BudgetError
from kvcompile.eval.evaluate import EvalConfig, evaluate_systems
from kvcompile.eval.report import Report
from kvcompile.fit.greedy import fit
from kvcompile.fit.pipeline import chosen_request, stats_from_profile
from kvcompile.memory import plan_memory_ratio
from kvcompile.plan import BudgetLayout, Plan
from kvcompile.profile.record import Profile
from kvcompile.runtime.engine import Engine
from kvcompile.settings import FitSettings

STARVED_WINDOW = 32
ARTIFACT = "artifact"


def refit_request(profile: Profile, **changes: object) -> FitSettings:
    """The settings of the shipped plan (``pipeline.chosen_request``: the measured choice's
    winner, else the recorded request) at its own budget and context, with ``changes`` applied."""
    request = chosen_request(profile, profile.settings.kv_budget, profile.settings.at_context)
    return replace(request, **changes)  # type: ignore[arg-type]


def refit(profile: Profile, arch: ArchSpec, **changes: object) -> Plan:
    """The profile's statistics fitted again with ``changes`` (e.g. ``kv_budget=0.0625``)."""
    return fit(stats_from_profile(profile), arch, refit_request(profile, **changes)).plan


def equal_memory_uniform(plan: Plan, arch: ArchSpec, context: int) -> Plan:
    """``uniform`` whose KV slots at ``context`` are at most ``plan``'s (and within one slot
    per head of them)."""
    budget = plan_memory_ratio(plan, arch, context)  # the one memory definition (sliding layers at their window)
    request = FitSettings(kv_budget=min(1.0, budget), at_context=context, policy="uniform")
    return fit(None, arch, request).plan


def lowest_scoring_full(profile: Profile, arch: ArchSpec) -> Plan:
    """The profile's fit with the retrieval ranking reversed: as many full heads as the
    shipped plan, taken from the bottom of the ranking."""
    stats = stats_from_profile(profile)
    request = refit_request(profile, full_heads=profile.plan.n_full)
    if request.full_rank == "needle":  # the ranking the shipped settings use, reversed
        stats.needle = -stats.needle
    else:
        stats.retrieval = -stats.retrieval
    return fit(stats, arch, request).plan


def starved_windows(plan: Plan, window: int = STARVED_WINDOW) -> Plan:
    """``plan``'s full heads kept; every budgeted head reduced to its sinks and ``window``."""
    layers = []
    for layer in plan.layers:
        if layer.sliding or layer.layout is None:
            layers.append(layer)
            continue
        layout = BudgetLayout(layer.layout.sinks, 0, 0, window)
        layers.append(replace(layer, layout=layout))
    return replace(plan, layers=tuple(layers), policy=f"{plan.policy}-sinks+{window}")


def quarter_budget(profile: Profile, arch: ArchSpec) -> Plan:
    """The profile refitted at a quarter of its budget (1/32 for the shipped 1/8), or, where
    that is below every head's smallest layout (tiny test profiles), at the smallest budget
    above it that fits, found in steps of 25% (at most 8, up to about 5x the quarter)."""
    budget = profile.settings.kv_budget / 4
    for _ in range(8):
        try:
            return refit(profile, arch, kv_budget=budget)
        except BudgetError:
            budget *= 1.25
    return refit(profile, arch, kv_budget=budget)


def broken_variants(profile: Profile, arch: ArchSpec, context: int) -> dict[str, Plan]:
    """The four regressions of the project's CI gate, for an eval at ``context`` tokens."""
    shipped = profile.plan
    return {
        "uniform (same memory)": equal_memory_uniform(shipped, arch, context),
        "refit at 1/32": quarter_budget(profile, arch),
        "lowest-scoring full heads": lowest_scoring_full(profile, arch),
        f"sinks + {STARVED_WINDOW}-token window": starved_windows(shipped),
    }


def evaluate_with_regressions(
    engine: Engine,
    profile: Profile,
    config: EvalConfig,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Report]:
    """Reports for the artifact ``engine`` serves and for each broken variant of its profile.

    ``engine`` is an artifact's (weights permuted for ``profile.plan``); the variants are
    rewritten into its head order and served next to it, so every case is prefilled once
    for the baseline, the artifact and all variants. The artifact's own plan is served in
    its identity order, which computes what ``evaluate(engine, config)`` computes. Variants
    are derived at the largest eval length (equal memory there).
    """
    if engine.plan != profile.plan:
        raise ValueError("the engine does not serve this profile's plan; load the artifact built from it")
    plans = {ARTIFACT: profile.plan.to_served(permuted_by=profile.plan)}
    for name, plan in broken_variants(profile, engine.arch, max(config.lengths)).items():
        plans[name] = plan.to_served(permuted_by=profile.plan)
    return evaluate_systems(engine, plans, config, progress=progress)


__all__ = [
    "ARTIFACT",
    "STARVED_WINDOW",
    "broken_variants",
    "equal_memory_uniform",
    "evaluate_with_regressions",
    "lowest_scoring_full",
    "refit",
    "refit_request",
    "starved_windows",
]
