"""Run the evaluation suite: systems and the uncompressed baseline, same cases, same process.

Protocol (docs/DESIGN.md): the context is prefilled once, exactly, and stored into every
system's cache (the artifact's static budgets, the all-full baseline, other plans when
comparing policies); then the question is fed through each cache separately, so a
compression never sees the question.
"""
from __future__ import annotations

import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from kvcompile import __version__
from kvcompile.errors import ContextLengthError, KVCompileError
from kvcompile.eval.report import (
    AccuracyRow,
    AccuracySide,
    ArtifactInfo,
    ContinuationCases,
    ContinuationRow,
    EvalSettings,
    KVMemory,
    NllSide,
    Report,
    Row,
)
from kvcompile.eval.tasks import TASKS, EvalCase, build_cases, score_answer
from kvcompile.memory import (
    BASELINE_DTYPES,
    baseline_bytes_per_value,
    memory_ratio,
    uncompressed_bytes,
)
from kvcompile.metrics import greedy_agreement, greedy_token, kl, log_probs, nll, nll_increase
from kvcompile.plan import HeadOrder, Plan
from kvcompile.runtime.cache import StaticKVCache
from kvcompile.runtime.engine import Engine
from kvcompile.runtime.head_order import ReorderedCache
from kvcompile.stats import mean_ci, relative_increase_ci, wilson_interval
from kvcompile.textsource import GENRES

ANSWER_TOKENS = 8  # greedy tokens generated for an answer (5-digit numbers need 5-6)
BASELINE = "baseline"


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...] = TASKS
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    samples: int = 10
    seed: int = 0
    agreement_tokens: int = 32
    task_samples: tuple[tuple[str, int], ...] = ()  # (task, cases) pairs overriding ``samples``
    genre: str = "pydoc"  # text the cases are built on (kvcompile.textsource.GENRES)
    baseline_dtype: str = "bfloat16"  # values of every ratio count at its bytes (kvcompile.memory)

    def __post_init__(self) -> None:
        if self.baseline_dtype not in BASELINE_DTYPES:
            raise KVCompileError(f"--baseline-dtype must be one of {', '.join(sorted(BASELINE_DTYPES))}, "
                                 f"got {self.baseline_dtype!r}")
        if self.genre not in GENRES:
            raise KVCompileError(f"--genre must be one of {', '.join(GENRES)}, got {self.genre!r}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise KVCompileError(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
        for task, n in (("", self.samples), *self.task_samples):
            if task and task not in self.tasks:
                raise KVCompileError(f"--samples names task {task!r}, which is not in --tasks")
            if n < 1:
                raise KVCompileError(f"--samples must be >= 1, got {n}{f' for {task}' if task else ''}")
        if not self.lengths or min(self.lengths) < 64:
            raise KVCompileError("--lengths must list context lengths of at least 64 tokens")

    def samples_for(self, task: str) -> int:
        """Cases per length for ``task``: its own count if given, else ``samples``."""
        return dict(self.task_samples).get(task, self.samples)


@dataclass
class _Tally:
    """One system's results for one task and length."""

    correct: int = 0
    n: int = 0
    seconds: float = 0.0
    nll: list[float] = field(default_factory=list)  # per case: mean over its continuation tokens
    kl: list[float] = field(default_factory=list)  # per case: mean KL(baseline || system) per token
    agree: list[float] = field(default_factory=list)  # per case: share of greedy tokens agreed
    agree_total: int = 0


def _greedy(engine: Engine, cache: Any, logits: torch.Tensor, steps: int) -> list[int]:
    tokens: list[int] = []
    for step in range(steps):
        token = greedy_token(logits[0])
        if token in engine.eos_token_ids:
            break
        tokens.append(token)
        if step + 1 < steps:
            logits = engine.extend(torch.tensor([[token]]), cache)
    return tokens


def _prefill(engine: Engine, case: EvalCase, caches: Mapping[str, Any]) -> tuple[torch.Tensor, float]:
    for cache in caches.values():
        cache.reset()
    started = time.perf_counter()
    logits = engine.prefill(torch.tensor([case.context_ids]), list(caches.values()))
    return logits, time.perf_counter() - started


def _answer(engine: Engine, case: EvalCase, caches: Mapping[str, Any], tallies: Mapping[str, _Tally]) -> None:
    _, prefill_s = _prefill(engine, case, caches)
    for name, cache in caches.items():
        started = time.perf_counter()
        logits = engine.extend(torch.tensor([case.question_ids]), cache)
        text = engine.tokenizer.decode(_greedy(engine, cache, logits, ANSWER_TOKENS), skip_special_tokens=True)
        tally = tallies[name]
        tally.correct += int(score_answer(text, case))
        tally.n += 1
        tally.seconds += prefill_s + time.perf_counter() - started


def _continue(engine: Engine, case: EvalCase, caches: Mapping[str, Any], tallies: Mapping[str, _Tally],
              agreement_tokens: int) -> None:
    """NLL of the held-out continuation, KL(baseline || system), greedy agreement."""
    last, prefill_s = _prefill(engine, case, caches)
    target = torch.tensor(case.continuation_ids, device=engine.device)
    logps: dict[str, torch.Tensor] = {}
    for name, cache in caches.items():
        started = time.perf_counter()
        rest = engine.extend(torch.tensor([case.continuation_ids[:-1]]), cache, all_logits=True)[0]
        logps[name] = log_probs(torch.cat([last, rest], dim=0))  # row t predicts target[t]
        tallies[name].nll.append(nll(logps[name], target))
        tallies[name].seconds += prefill_s + time.perf_counter() - started
        tallies[name].n += 1
    for name, logp in logps.items():
        tallies[name].kl.append(kl(logps[BASELINE], logp))
    # agreement: the baseline generates greedily, every system is teacher-forced on its tokens
    heads = {name: logp[-1] for name, logp in logps.items()}
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in caches}  # each system's [V] per step
    for _ in range(agreement_tokens):
        for name in caches:
            rows[name].append(heads[name].float())
        step = torch.tensor([[greedy_token(heads[BASELINE])]])
        heads = {name: engine.extend(step, cache)[0] for name, cache in caches.items()}
    if agreement_tokens:
        reference = torch.stack(rows[BASELINE])
        for name in caches:
            tallies[name].agree.append(greedy_agreement(reference, torch.stack(rows[name])))
            tallies[name].agree_total += agreement_tokens


def _generated_groups(engine: Engine, config: EvalConfig) -> list[tuple[str, int, list[EvalCase]]]:
    """(task, length, cases) of the generated tasks, task-major."""
    if max(config.lengths) + 64 > engine.max_context:
        raise ContextLengthError(
            f"context length {max(config.lengths)} leaves no room for the question within the max "
            f"context {engine.max_context}; use --lengths up to {engine.max_context - 64}"
        )
    groups = []
    for task in config.tasks:
        cases = build_cases(engine.tokenizer, task, list(config.lengths), config.samples_for(task),
                            config.seed, config.genre)
        groups += [(task, length, [c for c in cases if c.length == length]) for length in config.lengths]
    return groups


def _case_groups(cases: Sequence[EvalCase]) -> list[tuple[str, int, list[EvalCase]]]:
    """A team's cases (``kvcompile.eval.cases``): one group per task, reported at its longest context."""
    groups = []
    for task in dict.fromkeys(case.task for case in cases):
        group = [case for case in cases if case.task == task]
        groups.append((task, max(case.length for case in group), group))
    return groups


def evaluate_systems(engine: Engine, plans: Mapping[str, Plan], config: EvalConfig,
                     progress: Callable[[int, int, str], None] | None = None,
                     cases: Sequence[EvalCase] | None = None) -> dict[str, Report]:
    """One report per plan, each against the shared uncompressed baseline.

    Each plan is served as its head order says: in source order by the weights built for it
    (the engine's own plan); in served order (``Plan.to_served``) with its full heads moved
    first at attention time (the same function), the baseline then served alike.
    ``cases``: a team's own cases instead of the generated tasks (``config`` keeps the rest).
    """
    arch = engine.arch
    _check_source_plans(engine, plans)
    groups = _case_groups(cases) if cases else _generated_groups(engine, config)
    # tokens a case puts in the cache: context, question + answer, or continuation + agreement steps
    context = max(len(c.context_ids) + max(len(c.question_ids) + ANSWER_TOKENS,
                                           len(c.continuation_ids) - 1 + config.agreement_tokens)
                  for _, _, group in groups for c in group)
    if context > engine.max_context:
        raise ContextLengthError(
            f"the cases need {context} tokens of cache (context, question or continuation, generated tokens), "
            f"more than the context of {engine.max_context}; use shorter --lengths or fewer --agreement-tokens"
        )
    baseline_plan = engine.uncompressed_plan()
    all_plans = {BASELINE: baseline_plan, **plans}
    total = sum(len(group) for _, _, group in groups)
    done = 0
    started_all = time.perf_counter()
    rows: dict[str, list[Row]] = {name: [] for name in plans}
    served = dict(all_plans)
    if any(plan.order is HeadOrder.SERVED for plan in plans.values()):  # every head alike: any weights
        served[BASELINE] = baseline_plan.to_served(permuted_by=None)
    for task, length, group in groups:
        caches = {}
        for name, plan in served.items():
            cache = engine.allocate(1, max_context=context, plan=plan)
            reordered = plan.order is HeadOrder.SERVED
            caches[name] = ReorderedCache(cache, plan, arch.group_size) if reordered else cache
        tallies = {name: _Tally() for name in all_plans}
        for case in group:
            if task == "continuation":
                _continue(engine, case, caches, tallies, config.agreement_tokens)
            else:
                _answer(engine, case, caches, tallies)
            done += 1
            if progress is not None:
                progress(done, total, f"{task}@{length}")
        ratios = allocated_memory_ratios(engine, plans, length, config.baseline_dtype)
        for name in plans:
            row_of = _continuation_row if task == "continuation" else _accuracy_row
            rows[name].append(row_of(task, length, tallies[BASELINE], tallies[name], ratios[name], group))
    wall = round(time.perf_counter() - started_all, 2)
    reference = memory_context(engine, max(length for _, length, _ in groups))
    dtype = config.baseline_dtype
    baseline_bytes = uncompressed_bytes(arch, reference, baseline_bytes_per_value(dtype))
    plan_bytes = {name: kv_bytes_at(engine, plan, reference, dtype) for name, plan in plans.items()}
    allocated = {name: engine.allocate(1, max_context=reference, plan=served[name])
                 for name in plans}
    tasks = tuple(dict.fromkeys(task for task, _, _ in groups))
    settings = EvalSettings(
        tasks=tasks, lengths=tuple(sorted({length for _, length, _ in groups})),
        samples=None if cases else {task: config.samples_for(task) for task in tasks},
        genre=None if cases else config.genre, cases=len(cases) if cases else None,
        answer_tokens=ANSWER_TOKENS, agreement_tokens=config.agreement_tokens,
        systems_in_run=tuple(all_plans))
    created_with = {"python": platform.python_version(), "torch": torch.__version__,
                    "transformers": _version("transformers")}
    return {
        name: Report(
            kvcompile_version=__version__, created_with=created_with, seed=config.seed,
            settings=settings,
            memory=KVMemory(ratio=round(memory_ratio(plan_bytes[name], baseline_bytes), 6),
                            context=reference, measured="allocated", baseline_dtype=dtype,
                            artifact_bytes=plan_bytes[name], baseline_bytes=baseline_bytes,
                            allocated_bytes=allocated[name].nbytes,
                            allocated_dtype=_dtype_name(allocated[name])),
            wall_time_s=wall, rows=tuple(rows[name]))
        for name in plans
    }


def memory_context(engine: Engine, context: int) -> int:
    """The context whose buffers a request of ``context`` tokens really gets: its own in the
    torch runtime; the graphs' build context for ONNX graphs (their buffers are fixed then)."""
    return engine.buffer_context or context


def _check_source_plans(engine: Engine, plans: Mapping[str, Plan]) -> None:
    """A source-order plan is served by the engine's weights as they are, so it must be the
    head order they were built for (the engine's own plan)."""
    built = [layer.permutation for layer in engine.plan.layers]
    for name, plan in plans.items():
        if plan.order is HeadOrder.SOURCE and [layer.permutation for layer in plan.layers] != built:
            raise ValueError(f"plan {name!r} is in source order but the engine's weights hold another "
                             f"head order; pass plan.to_served(permuted_by=the weights' plan)")


def allocated_memory_ratios(engine: Engine, plans: Mapping[str, Plan], context: int,
                            baseline_dtype: str = "bfloat16") -> dict[str, float]:
    """The memory ratio every report row carries (``kvcompile.memory``): the KV state the
    runtime allocates for each plan at the buffer context of a ``context``-token request
    (:func:`memory_context`), values counted at ``baseline_dtype`` (:func:`kv_bytes_at`), over
    the source model's own cache there at the same bytes per value."""
    context = memory_context(engine, context)
    base = uncompressed_bytes(engine.arch, context, baseline_bytes_per_value(baseline_dtype))
    return {name: memory_ratio(kv_bytes_at(engine, plan, context, baseline_dtype), base)
            for name, plan in plans.items()}


def kv_bytes_at(engine: Engine, plan: Plan, context: int, baseline_dtype: str) -> int:
    """All KV state (``StaticKVCache.nbytes``) of the cache the torch runtime allocates for
    ``plan`` at ``context`` tokens with values in ``baseline_dtype``, whatever dtype the engine
    computes in; allocated on the meta device, so nothing is held.

    Reports count what the runtime allocates, not the plan's formula, so a cache that
    allocates more than its plan says shows up in the memory ratio and the gate; the dtype is
    the baseline's, so a float32 run is never counted as compression.
    """
    baseline_bytes_per_value(baseline_dtype)
    arch = engine.arch
    return StaticKVCache.allocate(plan, 1, context, arch.head_dim, arch.group_size,
                                  dtype=getattr(torch, baseline_dtype), device="meta").nbytes


def _dtype_name(cache: Any) -> str:
    """The dtype a cache holds its values in (``OnnxCache.dtype`` is already a name)."""
    return str(cache.dtype).removeprefix("torch.")


def evaluate(engine: Engine, config: EvalConfig, artifact_info: ArtifactInfo | None = None,
             progress: Callable[[int, int, str], None] | None = None,
             cases: Sequence[EvalCase] | None = None) -> Report:
    """The artifact's report: its own plan (weights already permuted) against the baseline."""
    report = evaluate_systems(engine, {"artifact": engine.plan}, config, progress=progress,
                              cases=cases)["artifact"]
    return replace(report, artifact=artifact_info or ArtifactInfo())


def _accuracy_row(task: str, length: int, base: _Tally, system: _Tally, ratio: float,
                  group: list[EvalCase]) -> AccuracyRow:
    def side(tally: _Tally) -> AccuracySide:
        lo, hi = wilson_interval(tally.correct, tally.n)
        return AccuracySide(correct=tally.correct, accuracy=round(tally.correct / tally.n, 6),
                            ci95=(round(lo, 6), round(hi, 6)), wall_time_s=round(tally.seconds, 3))

    return AccuracyRow(task=task, length=length, n=len(group), baseline=side(base), artifact=side(system),
                       memory_ratio=round(ratio, 6))


def _continuation_row(task: str, length: int, base: _Tally, system: _Tally, ratio: float,
                      group: list[EvalCase]) -> ContinuationRow:
    """NLL, KL and agreement with 95% intervals over the cases (tokens of one case are not
    independent draws), and the per-case values the gate's power computation reads."""
    base_nll = sum(base.nll) / len(base.nll)
    art_nll = sum(system.nll) / len(system.nll)
    _, inc_lo, inc_hi = relative_increase_ci(system.nll, base.nll)
    kl_mean, kl_lo, kl_hi = mean_ci(system.kl)
    row = ContinuationRow(
        task=task, length=length, n=len(group),
        tokens=round(sum(len(case.continuation_ids) for case in group) / len(group)),
        baseline=NllSide(nll=round(base_nll, 6), wall_time_s=round(base.seconds, 3)),
        artifact=NllSide(nll=round(art_nll, 6), wall_time_s=round(system.seconds, 3)),
        nll_increase=round(nll_increase(art_nll, base_nll), 6),
        nll_increase_ci95=(round(inc_lo, 6), round(inc_hi, 6)),
        kl=round(kl_mean, 6), kl_ci95=(round(kl_lo, 6), round(kl_hi, 6)),
        memory_ratio=round(ratio, 6),
        cases=ContinuationCases(baseline_nll=tuple(round(x, 6) for x in base.nll),
                                artifact_nll=tuple(round(x, 6) for x in system.nll),
                                kl=tuple(round(x, 6) for x in system.kl)),
    )
    if system.agree_total:
        p, lo, hi = mean_ci(system.agree)
        row = replace(row, agreement=round(p, 6), agreement_n=system.agree_total,
                      agreement_ci95=(round(max(0.0, lo), 6), round(min(1.0, hi), 6)),
                      cases=replace(row.cases, agreement=tuple(round(x, 6) for x in system.agree)))
    return row


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
