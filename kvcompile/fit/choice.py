"""Fitting step 3, first part (the measured choice): the plan is chosen by measured loss, not
by the proxies alone; the held-out check that the profile reports is ``validation``.

The proxy fit (retrieval scores, error curves, answer-loss curves) proposes several plans at
the same memory: different numbers of full heads, a quarter or half of each budgeted head's
free slots given to selected tokens, and ``uniform`` itself. Each is served by the runtime on
held-out calibration prompts (one exact prefill per prompt fills every candidate's cache,
``ReorderedCache`` serves a plan on the unpermuted model) and scored on two things: the answer
log-probability of needle probes, and the NLL and KL of real text against the uncompressed
model. Only candidates at least as good as ``uniform`` on answers (NLL increase) and on text
(NLL increase plus KL, nats per token) are eligible; ``uniform`` always is, so the chosen plan
never measures worse than ``uniform`` on these prompts, by construction. Among the eligible,
the lowest mean of the two losses, each relative to ``uniform``'s, wins.

The choice picks precision too: beside the full-precision candidates it measures the same
variants with the head groups quantized (``STORAGE_CHOICES``), at the same bytes, so codes buy
longer windows and more full heads. A quantized candidate is eligible only when neither loss is
above those of the best full-precision candidate (the one today's rule would choose) either:
the chosen plan never measures worse than that one nor ``uniform``, by construction.

The prompts are shorter than the fit's reference context when that is long (8K: 2K prompts,
for time), where ``uniform``'s windows cover more of the prompt than they would at 8K: the
comparison then favours ``uniform``, never the other way.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from kvcompile.arch import ArchSpec
from kvcompile.errors import BudgetError
from kvcompile.fit.greedy import FitResult, fit
from kvcompile.metrics import kl, log_probs, nll
from kvcompile.plan import Plan, Storage
from kvcompile.profile.calibration import build_probe, multikey_spec, passkey_spec, probe_prompt
from kvcompile.profile.statistics import HeadStatistics
from kvcompile.runtime.engine import Engine
from kvcompile.runtime.head_order import ReorderedCache
from kvcompile.runtime.model import CompactLM
from kvcompile.settings import FitSettings
from kvcompile.textsource import bos_prefix, calibration_paragraphs, haystack_ids
from kvcompile.yamlio import rounded

UNCOMPRESSED = "uncompressed"
UNIFORM = "uniform"
LOSSES = ("answer_nll", "text_nll", "text_kl")
SELECTED_FRACTIONS = (0.25, 0.5)  # the budgeted heads' splits the choice measures (the request's is one)
# (full heads, budgeted heads) storages measured beside full precision when the request asks for
# none: 8-bit, 8-bit keys with 4-bit values, and 4-bit with the budgeted values at 2 bits; each
# with every full-precision variant, so the candidates stay few (each is run on every prompt)
STORAGE_CHOICES = (("k8v8", "k8v8"), ("k8v4", "k8v4"), ("k4v4", "k4v2"))


@dataclass(frozen=True)
class ChoiceConfig:
    """Held-out prompts of the measured choice: calibration text, seeds apart from the profiler's."""

    length: int = 2048  # context tokens of every prompt (capped by the fit's reference context)
    n_passkey: int = 2
    n_multikey: int = 2
    n_text: int = 2
    text_tokens: int = 32  # scored continuation tokens per text prompt
    seed: int = 0
    storages: tuple[tuple[str, str], ...] = STORAGE_CHOICES  # quantized (full, budgeted) storages measured


@dataclass(frozen=True)
class HeldOutPrompt:
    """``ids[:context_length]`` is prefilled and compressed; tokens at ``targets`` are scored."""

    name: str
    kind: str  # "answer" (needle probe) or "text"
    ids: tuple[int, ...]
    context_length: int
    targets: tuple[int, ...]


@dataclass(frozen=True)
class Losses:
    answer_nll: float  # mean over probes of the answer tokens' mean NLL
    text_nll: float  # mean NLL of the scored text tokens
    text_kl: float  # mean KL(uncompressed || plan) over the scored text tokens

    def as_dict(self) -> dict[str, float]:
        return {name: rounded(getattr(self, name), 6) for name in LOSSES}


@dataclass(frozen=True)
class Candidate:
    name: str
    request: FitSettings
    result: FitResult


def held_out_prompts(tokenizer: Any, config: ChoiceConfig) -> list[HeldOutPrompt]:
    """Needle probes and text continuations from calibration paragraphs, on their own seeds."""
    paragraphs = calibration_paragraphs()
    prompts = []
    for kind, count in (("passkey", config.n_passkey), ("multikey", config.n_multikey)):
        for i in range(count):
            key = f"choice:{config.seed}:{kind}:{i}"
            rng = random.Random(key)
            depth = round(rng.uniform(0.1, 0.9), 3)
            spec = passkey_spec(str(rng.randrange(10000, 100000)), depth) if kind == "passkey" \
                else multikey_spec(rng, depth)
            probe = build_probe(tokenizer, paragraphs, spec, config.length, f"{key}:filler")
            prompt = probe_prompt(f"{kind}-{i}", kind, probe)
            targets = tuple(p + 1 for p in prompt.answer_positions)
            prompts.append(HeldOutPrompt(prompt.name, "answer", prompt.input_ids, prompt.context_length, targets))
    bos = bos_prefix(tokenizer)
    for i in range(config.n_text):
        n_context = config.length - len(bos)
        ids = bos + haystack_ids(tokenizer, paragraphs, n_context + config.text_tokens,
                                 f"choice:{config.seed}:text:{i}")
        targets = tuple(range(config.length, config.length + config.text_tokens))
        prompts.append(HeldOutPrompt(f"text-{i}", "text", tuple(ids), config.length, targets))
    return prompts


def measure_plans(model: CompactLM, tokenizer: Any, plans: dict[str, Plan], prompts: Sequence[HeldOutPrompt],
                  progress: Callable[[HeldOutPrompt], None] | None = None) -> dict[str, Losses]:
    """Losses of every plan and of the uncompressed model (key ``UNCOMPRESSED``) on ``prompts``.

    Each prompt's context is prefilled once, exactly, into every plan's cache; the rest of the
    prompt is then fed through each cache separately, as ``kvcompile eval`` does.
    """
    arch = model.arch
    engine = Engine(model, next(iter(plans.values())), tokenizer, eos_token_ids=(-1,))
    all_plans = {UNCOMPRESSED: engine.uncompressed_plan(), **plans}
    longest = max(len(p.ids) for p in prompts)
    caches = {name: ReorderedCache(engine.allocate(1, max_context=longest, plan=plan),
                                   plan.to_served(permuted_by=None), arch.group_size)  # source weights
              for name, plan in all_plans.items()}
    answer: dict[str, list[float]] = {name: [] for name in all_plans}
    text_nll: dict[str, list[float]] = {name: [] for name in all_plans}
    text_kl: dict[str, list[float]] = {name: [] for name in all_plans}
    for prompt in prompts:
        for cache in caches.values():
            cache.reset()
        n_ctx = prompt.context_length
        last = engine.prefill(torch.tensor([prompt.ids[:n_ctx]]), list(caches.values()))
        suffix = torch.tensor([prompt.ids[n_ctx:max(prompt.targets)]])
        # row r of [last, extend] predicts token n_ctx + r
        rows = torch.tensor(prompt.targets, device=engine.device) - n_ctx
        target = torch.tensor([prompt.ids[j] for j in prompt.targets], device=engine.device)
        logps = {}
        for name, cache in caches.items():
            logits = last if suffix.shape[1] == 0 else torch.cat([last, engine.extend(suffix, cache, True)[0]])
            logps[name] = log_probs(logits[rows])
        for name, logp in logps.items():
            if prompt.kind == "answer":
                answer[name].append(nll(logp, target))
            else:
                text_nll[name].append(nll(logp, target))
                text_kl[name].append(kl(logps[UNCOMPRESSED], logp))
        if progress is not None:
            progress(prompt)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    return {name: Losses(mean(answer[name]), mean(text_nll[name]), mean(text_kl[name])) for name in all_plans}


def candidates(stats: HeadStatistics, arch: ArchSpec, request: FitSettings,
               storages: Sequence[tuple[str, str]] = STORAGE_CHOICES) -> list[Candidate]:
    """The proxy fit, other full heads, other capacity splits, each also in the quantized
    ``storages`` (when the request's storages are full precision), and ``uniform``; distinct
    plans only.

    Full heads in retrieval-score order: half of those above the score threshold, all of them;
    in needle-mass order (the heads answers read most, which the combined score can rank
    lower): half of them and two fewer than all. Each is skipped where it does not fit the
    hard minimum layout. The proxy fit's heads also with the other share of selected slots in
    ``SELECTED_FRACTIONS`` when the request's is one of them: selected tokens carry text copied
    from far back, windows the near context, and which matters more depends on the budget.
    (Also measured, rarely chosen, dropped for time: no full heads, an equal split of the
    capacities; docs/BENCHMARKS.md.)
    """
    proxy = fit(stats, arch, request)
    k = proxy.plan.n_full
    wanted = k + len(proxy.demoted)
    requests = [(f"profiled, {k} full heads (proxy fit)", request)]
    if request.full_heads is None:
        requests += [(f"profiled, {n} full heads", replace(request, full_heads=n))
                     for n in sorted({wanted // 2, wanted}) if n != k]
        requests += [(f"profiled, {n} full heads by needle mass", replace(request, full_heads=n, full_rank="needle"))
                     for n in sorted({wanted // 2, wanted - 2}) if n > 0]
    if request.selected_fraction in SELECTED_FRACTIONS:  # another share was the user's to set
        requests += [(f"profiled, {k} full heads, {fraction:g} selected",
                      replace(request, selected_fraction=fraction))
                     for fraction in SELECTED_FRACTIONS if fraction != request.selected_fraction]
    if not (request.full_storage.quantized or request.budget_storage.quantized):  # else the user's to set
        requests += [(f"{name}, {full}/{budgeted}",
                      replace(req, full_storage=Storage.parse(full), budget_storage=Storage.parse(budgeted)))
                     for full, budgeted in storages for name, req in list(requests)]
    requests.append((UNIFORM, replace(request, policy="uniform", full_heads=None)))
    out: list[Candidate] = []
    seen: set[Plan] = set()
    for name, req in requests:
        try:
            result = proxy if req is request else fit(stats, arch, req)
        except BudgetError:
            continue  # that many full heads do not fit this budget
        if result.plan in seen:
            continue
        seen.add(result.plan)
        out.append(Candidate(name, req, result))
    return out


SCORE_WEIGHTS = (0.5, 0.5)  # answer loss, text loss (each relative to uniform's)


def losses_over(base: Losses, item: Losses) -> tuple[float, float]:
    """(answer loss, text loss) in nats per token: the answer NLL's increase over ``base``, and
    the text NLL's increase plus the KL from ``base``."""
    return item.answer_nll - base.answer_nll, item.text_nll - base.text_nll + item.text_kl


def choose(losses: dict[str, Losses], names: Sequence[str],
           full_precision: Collection[str] | None = None) -> tuple[str, dict[str, dict[str, Any]]]:
    """The eligible candidate with the lowest relative loss.

    Each loss (:func:`losses_over` the uncompressed model) is divided by ``uniform``'s and
    weighted by ``SCORE_WEIGHTS``; ``uniform`` scores 1 and is always eligible. Eligible: neither
    loss above ``uniform``'s; for a candidate not in ``full_precision`` (``None``: every name is),
    neither above those of the best eligible full-precision candidate either. Ties go to full
    precision, then to ``uniform``.
    """
    exact = set(names) if full_precision is None else set(full_precision) & set(names)
    if UNIFORM not in exact:
        raise ValueError("uniform must be one of the full-precision candidates")
    base = losses[UNCOMPRESSED]
    reference = losses_over(base, losses[UNIFORM])
    table: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = losses_over(base, losses[name])
        eligible = all(m <= r for m, r in zip(mine, reference, strict=True))
        score = sum(w * (m / r if r > 1e-9 else (0.0 if m <= 1e-9 else float("inf")))
                    for w, m, r in zip(SCORE_WEIGHTS, mine, reference, strict=True))
        table[name] = {"eligible": eligible, "score": score}

    def rank(name: str) -> tuple[float, bool, bool]:
        return table[name]["score"], name not in exact, name != UNIFORM

    best_exact = min((n for n in names if n in exact and table[n]["eligible"]), key=rank)
    bar = losses_over(base, losses[best_exact])
    for name in names:
        if name not in exact:
            mine = losses_over(base, losses[name])
            table[name]["eligible"] = table[name]["eligible"] and all(
                m <= b for m, b in zip(mine, bar, strict=True))
    chosen = min((n for n in names if table[n]["eligible"]), key=rank)
    return chosen, table


def choose_plan(model: CompactLM, tokenizer: Any, stats: HeadStatistics, request: FitSettings,
                config: ChoiceConfig = ChoiceConfig(),
                progress: Callable[[HeldOutPrompt], None] | None = None) -> tuple[FitResult, dict[str, Any]]:
    """The measured choice among :func:`candidates`; returns the chosen fit and the profile's record."""
    arch = model.arch
    config = replace(config, length=min(config.length, request.at_context))
    pool = candidates(stats, arch, request, config.storages)
    prompts = held_out_prompts(tokenizer, config)
    losses = measure_plans(model, tokenizer, {c.name: c.result.plan for c in pool}, prompts, progress)
    exact = [c.name for c in pool if not c.result.plan.quantized]
    chosen, table = choose(losses, [c.name for c in pool], exact)
    picked = next(c for c in pool if c.name == chosen)
    result = picked.result
    result.notes.append(f"measured choice: {chosen} (of {len(pool)} candidates, {len(prompts)} held-out prompts)")
    record = {
        "context_tokens": config.length,
        "prompts": {"passkey": config.n_passkey, "multikey": config.n_multikey, "text": config.n_text,
                    "text_tokens": config.text_tokens, "seed": config.seed},
        "rule": "eligible: answer loss (answer NLL increase) and text loss (text NLL increase + KL) no higher "
                "than uniform's, and for a quantized candidate no higher than the best full-precision "
                "candidate's; chosen: the lowest 0.5 answer + 0.5 text loss, each divided by uniform's",
        "uncompressed": losses[UNCOMPRESSED].as_dict(),
        "candidates": [
            {"name": c.name, "policy": c.result.plan.policy, "full_heads": c.result.plan.n_full,
             "equal_weight": c.request.equal_weight,
             **({"selected_fraction": c.request.selected_fraction, "full_storage": c.request.full_storage.name,
                 "budget_storage": c.request.budget_storage.name} if c.result.plan.policy == "profiled" else {}),
             **losses[c.name].as_dict(),
             "eligible": table[c.name]["eligible"], "score": rounded(table[c.name]["score"], 6)}
            for c in pool
        ],
        "chosen": chosen,
        # the fit settings that rebuild the chosen plan from the statistics (``pipeline.chosen_request``)
        "chosen_settings": picked.request,
    }
    return result, record
