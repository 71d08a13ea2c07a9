"""Fitting step 3, second part (the held-out check, ``fit.validation`` in the profile): the
chosen plan (``choice``) on a held-out calibration prompt against the full model.

Model-level KL of the next-token distributions on a continuation fed through the
static-budget cache after an exactly prefilled context — the same protocol as eval, on
calibration text that the profiler did not score.
"""
from __future__ import annotations

from typing import Any

import torch

from kvcompile.metrics import kl, log_probs, nll, nll_increase
from kvcompile.plan import Plan
from kvcompile.runtime.engine import Engine
from kvcompile.runtime.head_order import ReorderedCache
from kvcompile.runtime.model import CompactLM
from kvcompile.textsource import calibration_paragraphs, haystack_ids
from kvcompile.yamlio import rounded

SCORED_TOKENS = 128


def validate_plan(model: CompactLM, plan: Plan, tokenizer: Any, length: int, seed: int) -> dict[str, Any]:
    """KL(full || plan) and NLL change on ``length`` held-out tokens (last 128 scored)."""
    length = max(SCORED_TOKENS + 16, min(length, model.arch.max_context))
    ids = haystack_ids(tokenizer, calibration_paragraphs(), length, seed=f"validation:{seed}")
    context, continuation = ids[:-SCORED_TOKENS], ids[-SCORED_TOKENS:]
    engine = Engine(model, plan, tokenizer, eos_token_ids=(-1,))
    baseline_plan = engine.uncompressed_plan()
    caches = {
        name: ReorderedCache(engine.allocate(1, max_context=length, plan=p),
                             p.to_served(permuted_by=None), model.arch.group_size)  # source weights
        for name, p in (("full", baseline_plan), ("plan", plan))
    }
    last = engine.prefill(torch.tensor([context]), list(caches.values()))
    target = torch.tensor(continuation, device=engine.device)
    logps = {}
    for name, cache in caches.items():
        rest = engine.extend(torch.tensor([continuation[:-1]]), cache, all_logits=True)[0]
        logps[name] = log_probs(torch.cat([last, rest]))
    nlls = {name: nll(lp, target) for name, lp in logps.items()}
    return {
        "context_tokens": len(context),
        "scored_tokens": SCORED_TOKENS,
        "kl": rounded(kl(logps["full"], logps["plan"]), 4),
        "nll_full": rounded(nlls["full"], 5),
        "nll_plan": rounded(nlls["plan"], 5),
        "nll_increase": rounded(nll_increase(nlls["plan"], nlls["full"]), 4),
    }
