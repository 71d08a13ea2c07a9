"""How much a better token selection could win back at one memory target: an oracle that reads ahead.

The profiled plan's budgeted heads fill their selected slots with a question-agnostic score (the
attention a token receives from the last prompt positions). This bench serves the plan twice on
the benchmark, next to the uncompressed model: with that score, and with an oracle that scores
each context token by the attention it receives from the tokens that will follow the context
(the question, or the held-out continuation), taken from an exact prefill of context + follow-up.
Same full heads, same capacities; only which middle tokens are kept differs. What the oracle does
not win back, no question-agnostic score can be expected to (docs/BENCHMARKS.md, "Where the 1/8
answers go"). Costs one extra prefill per case.

    python bench/oracle_selection.py --budget 0.125 --genre licenses --threads 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # sleeping OpenMP workers (bench/decode.py)

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from kvcompile.eval.evaluate import (  # noqa: E402
    ANSWER_TOKENS,
    BASELINE,
    EvalConfig,
    _answer,
    _continue,
    _generated_groups,
    _Tally,
)
from kvcompile.fit.greedy import fit  # noqa: E402
from kvcompile.fit.pipeline import request_from_profile, stats_from_profile  # noqa: E402
from kvcompile.models import load_model  # noqa: E402
from kvcompile.profile.record import load_profile  # noqa: E402
from kvcompile.runtime.cache import compress_prefill, selection_scores  # noqa: E402
from kvcompile.runtime.engine import Engine  # noqa: E402
from kvcompile.runtime.head_order import ReorderedCache, ReorderedLayer  # noqa: E402
from kvcompile.textsource import GENRES  # noqa: E402

SHIPPED, ORACLE = "shipped selection", "oracle selection"


class RecordingLayer:
    """Prefills as its plan's layer does and keeps the (reordered) queries and keys it saw."""

    def __init__(self, layer: ReorderedLayer) -> None:
        self.layer = layer
        self.q: Tensor | None = None
        self.k: Tensor | None = None

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, *args) -> Tensor:
        self.q, self.k = q[:, self.layer.q_order], k[:, self.layer.kv_order]
        return self.layer.prefill(q, k, v, *args)


class OracleLayer:
    """A plan's layer whose budgeted heads keep the middle tokens the follow-up attends to most."""

    def __init__(self, layer: ReorderedLayer, recorded: RecordingLayer, group_size: int) -> None:
        self.layer, self.recorded, self.group_size = layer, recorded, group_size

    def store(self, q: Tensor, k: Tensor, v: Tensor, scale: float, *_) -> None:
        inner = self.layer.inner
        k, v = k[:, self.layer.kv_order], v[:, self.layer.kv_order]
        n_full, n_tok = inner.n_full, k.shape[2]
        if inner.full is not None:
            inner.full.write(k[:, :n_full], v[:, :n_full])
        if inner.budgeted is not None:
            seen_q, seen_k = self.recorded.q, self.recorded.k
            # the follow-up's queries are the last ones of the recorded prefill: its "observation window"
            scores = selection_scores(seen_q[:, n_full * self.group_size:], seen_k[:, n_full:], scale,
                                      "attention", seen_q.shape[2] - n_tok)[..., :n_tok]
            compress_prefill(k[:, n_full:], v[:, n_full:], scores, inner.budgeted.layout, out=inner.budgeted)
        inner.length = n_tok

    def extend(self, q: Tensor, k: Tensor, v: Tensor, *args) -> Tensor:
        return self.layer.extend(q, k, v, *args)


def follow_up(task: str, case) -> list[int]:
    """The tokens that come after the context: the question, or the continuation but its last."""
    return case.continuation_ids[:-1] if task == "continuation" else case.question_ids


def summary(task: str, tally: _Tally, base: _Tally) -> str:
    """Cases correct, or the continuation's NLL increase and KL against the baseline."""
    if task != "continuation":
        return f"{tally.correct}/{tally.n}"
    if tally is base:
        return "—"
    nll = statistics.mean(tally.nll) / statistics.mean(base.nll) - 1
    return f"NLL {100 * nll:+.2f}%, KL {statistics.mean(tally.kl):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--profile", type=Path, default=Path("profiles/smollm2-135m-instruct.yaml"))
    parser.add_argument("--budget", type=float, default=0.125)
    parser.add_argument("--at-context", type=int, default=4096)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--tasks", default="passkey,multikey,continuation")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--genre", default="pydoc", choices=sorted(GENRES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded = load_model(args.model)
    profile = load_profile(args.profile)
    # the proxy fit with the profile's own settings, as bench/variants.py's first variant
    plan = fit(stats_from_profile(profile), loaded.arch,
               request_from_profile(profile, args.budget, args.at_context)).plan
    group = loaded.arch.group_size
    engine = Engine(loaded.build(), plan, loaded.tokenizer)
    plan = plan.to_served(permuted_by=None)  # reordered at attention time on the source weights
    config = EvalConfig(tasks=tuple(args.tasks.split(",")), lengths=(args.length,), samples=args.samples,
                        seed=args.seed, genre=args.genre, agreement_tokens=0)
    results: dict[str, dict[str, str]] = {}
    for task, _, cases in _generated_groups(engine, config):
        room = max(len(c.context_ids) + len(follow_up(task, c)) + ANSWER_TOKENS for c in cases)
        recorder = ReorderedCache(engine.allocate(1, max_context=room, plan=plan), plan, group)
        recorder.layers = [RecordingLayer(layer) for layer in recorder.layers]
        oracle = ReorderedCache(engine.allocate(1, max_context=room, plan=plan), plan, group)
        oracle.layers = [OracleLayer(layer, seen, group) for layer, seen in zip(oracle.layers, recorder.layers,
                                                                                 strict=True)]
        caches = {BASELINE: engine.allocate(1, max_context=room, plan=engine.uncompressed_plan()),
                  SHIPPED: ReorderedCache(engine.allocate(1, max_context=room, plan=plan), plan, group),
                  ORACLE: oracle}
        tallies = {name: _Tally() for name in caches}
        for i, case in enumerate(cases, 1):
            recorder.reset()
            engine.prefill(torch.tensor([case.context_ids + follow_up(task, case)]), [recorder])
            if task == "continuation":
                _continue(engine, case, caches, tallies, agreement_tokens=0)
            else:
                _answer(engine, case, caches, tallies)
            print(f"[{time.perf_counter() - started:6.0f} s] {task} {i}/{len(cases)}", flush=True)
        results[task] = {name: summary(task, tally, tallies[BASELINE]) for name, tally in tallies.items()}
    print(f"\n{args.genre}, {args.length} tokens, seed {args.seed}, plan at {args.budget:g} of the KV cache "
          f"({plan.n_full} full heads)\n")
    print("| selection | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for name in (BASELINE, SHIPPED, ORACLE):
        print(f"| {name} | " + " | ".join(row[name] for row in results.values()) + " |")


if __name__ == "__main__":
    main()
