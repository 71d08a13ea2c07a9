"""The measured choice: never worse than ``uniform`` on its held-out prompts, at every budget.

The losses of the chosen plan and of ``uniform`` are recomputed here independently: one cache
per plan, its own prefill, and plain NLL / KL arithmetic, not ``measure_plans``' shared prefill.
"""
from __future__ import annotations

import random

import pytest
import torch

from kvcompile.fit.choice import (
    SELECTED_FRACTIONS,
    STORAGE_CHOICES,
    UNCOMPRESSED,
    UNIFORM,
    ChoiceConfig,
    HeldOutPrompt,
    Losses,
    candidates,
    choose,
    choose_plan,
    held_out_prompts,
    measure_plans,
)
from kvcompile.fit.greedy import fit
from kvcompile.plan import Plan
from kvcompile.profile.statistics import HeadStatistics
from kvcompile.runtime.engine import Engine
from kvcompile.runtime.head_order import ReorderedCache
from kvcompile.runtime.model import CompactLM
from kvcompile.settings import FitSettings
from tests.tiny import VOCAB, tiny_loaded

SWEEP = (1 / 4, 1 / 6, 1 / 8, 1 / 10, 1 / 12, 1 / 16)


def reference_losses(model: CompactLM, plan: Plan, prompts: list[HeldOutPrompt]) -> tuple[float, float, float]:
    """(answer NLL, text NLL, text KL) of ``plan``, one fresh prefill per plan and prompt."""
    engine = Engine(model, plan, None, eos_token_ids=(-1,))

    def logprobs(p: Plan, prompt: HeldOutPrompt) -> torch.Tensor:
        cache = ReorderedCache(engine.allocate(1, max_context=len(prompt.ids), plan=p),
                               p.to_served(permuted_by=None), model.arch.group_size)
        n = prompt.context_length
        first = engine.prefill(torch.tensor([prompt.ids[:n]]), [cache])
        rest = engine.extend(torch.tensor([prompt.ids[n:max(prompt.targets)]]), cache, all_logits=True)[0]
        rows = [j - n for j in prompt.targets]
        return torch.log_softmax(torch.cat([first, rest])[rows].float(), dim=-1)

    answers, nlls, kls = [], [], []
    for prompt in prompts:
        logp = logprobs(plan, prompt)
        target = torch.tensor([prompt.ids[j] for j in prompt.targets])
        nll = -logp[torch.arange(len(target)), target].mean().item()
        if prompt.kind == "answer":
            answers.append(nll)
        else:
            full = logprobs(engine.uncompressed_plan(), prompt)
            nlls.append(nll)
            kls.append((full.exp() * (full - logp)).sum(-1).mean().item())
    return sum(answers) / len(answers), sum(nlls) / len(nlls), sum(kls) / len(kls)


def random_prompts(n_answer: int, n_text: int, context: int, scored: int, seed: int) -> list[HeldOutPrompt]:
    rng = random.Random(seed)
    prompts = []
    for i in range(n_answer + n_text):
        kind = "answer" if i < n_answer else "text"
        ids = tuple(rng.randrange(3, VOCAB) for _ in range(context + scored))
        prompts.append(HeldOutPrompt(f"{kind}-{i}", kind, ids, context, tuple(range(context, context + scored))))
    return prompts


def random_stats(n_layers: int, n_kv: int, seed: int) -> HeadStatistics:
    gen = torch.Generator().manual_seed(seed)
    shape = (n_layers, n_kv)
    grid = (8, 16, 32, 64, 128)
    error = torch.rand((*shape, len(grid)), generator=gen).sort(dim=-1, descending=True).values
    return HeadStatistics(grid, *(torch.rand(shape, generator=gen) for _ in range(6)), error=error)


@pytest.fixture(scope="module")
def tiny():
    loaded = tiny_loaded("llama", seed=3, num_hidden_layers=4, max_position_embeddings=512)
    return loaded, loaded.build()


# quantized candidates are slower to serve on CPU: one storage pair, at two of the budgets
QUANTIZED_SWEEP = {1 / 4: (("k4v4", "k4v2"),), 1 / 10: (("k8v4", "k8v4"),)}


@pytest.mark.parametrize("budget", SWEEP)
def test_chosen_plan_is_never_worse_than_uniform_at_every_budget(tiny, budget: float) -> None:
    """Nor, where quantized candidates are measured, than the best full-precision candidate
    (the lowest score among those no worse than uniform, found here by hand)."""
    loaded, model = tiny
    arch = loaded.arch
    stats = random_stats(arch.n_layers, arch.n_kv_heads, seed=int(budget * 1000))
    request = FitSettings(kv_budget=budget, at_context=256, min_window=4, min_budgeted_capacity=16)
    prompts = random_prompts(2, 2, context=240, scored=12, seed=int(budget * 1000))
    pool = candidates(stats, arch, request, QUANTIZED_SWEEP.get(budget, ()))
    losses = measure_plans(model, None, {c.name: c.result.plan for c in pool}, prompts)
    exact = [c.name for c in pool if not c.result.plan.quantized]
    chosen, table = choose(losses, [c.name for c in pool], exact)
    base = losses[UNCOMPRESSED]

    def over(name: str) -> tuple[float, float]:
        item = losses[name]
        return item.answer_nll - base.answer_nll, item.text_nll - base.text_nll + item.text_kl

    ref = over(UNIFORM)
    fair = [n for n in exact if all(m <= r for m, r in zip(over(n), ref, strict=True))]
    best = min(fair, key=lambda n: 0.5 * over(n)[0] / ref[0] + 0.5 * over(n)[1] / ref[1])
    assert all(m <= b + 1e-12 for m, b in zip(over(chosen), over(best), strict=True))
    if budget in QUANTIZED_SWEEP:
        assert len(exact) < len(pool)
    plan = next(c for c in pool if c.name == chosen).result.plan
    uniform = fit(None, arch, FitSettings(kv_budget=budget, at_context=256, policy="uniform"))
    mine = reference_losses(model, plan, prompts)
    theirs = reference_losses(model, uniform.plan, prompts)
    base = reference_losses(model, Plan.uncompressed(arch.n_layers, arch.n_kv_heads), prompts)
    assert mine[0] - base[0] <= theirs[0] - base[0] + 1e-5  # answer loss
    assert mine[1] + mine[2] <= theirs[1] + theirs[2] + 1e-5  # text loss: NLL (same base) + KL
    # the shared-prefill measurement agrees with the independent one
    assert losses[chosen].answer_nll == pytest.approx(mine[0], abs=1e-4)
    assert losses[UNIFORM].text_kl == pytest.approx(theirs[2], abs=1e-4)
    assert table[chosen]["eligible"]


def test_choose_by_hand() -> None:
    """Eligible = neither loss above uniform's; then the lowest mean loss relative to uniform's.

    Answer loss: answer NLL increase; text loss: text NLL increase + KL (nats per token).
    """
    base = Losses(1.0, 2.0, 0.0)
    losses = {
        UNCOMPRESSED: base,
        UNIFORM: Losses(3.0, 2.2, 0.10),  # answer 2.0, text 0.2 + 0.1 = 0.3 -> score 1
        "retrieval": Losses(1.2, 2.3, 0.05),  # text 0.35 > 0.3: not eligible
        "both": Losses(2.0, 2.1, 0.11),  # 0.5 x 1.0 / 2.0 + 0.5 x 0.21 / 0.3 = 0.6
        "text": Losses(2.9, 2.02, 0.04),  # 0.5 x 0.95 + 0.5 x 0.2 = 0.575: the winner
        "mixed": Losses(2.5, 2.05, 0.12),  # KL above uniform's, text loss 0.17 below: eligible
    }
    chosen, table = choose(losses, ["retrieval", "both", "text", "mixed", UNIFORM])
    assert not table["retrieval"]["eligible"]
    assert table["mixed"]["eligible"]
    assert table["both"]["score"] == pytest.approx(0.6)
    assert table[UNIFORM]["score"] == pytest.approx(1.0)
    assert table["mixed"]["score"] == pytest.approx(0.5 * 0.75 + 0.5 * 0.17 / 0.3)
    assert chosen == "text"
    # nothing beats uniform on both: uniform itself
    worse = {**losses, "text": Losses(3.1, 2.0, 0.0), "both": Losses(1.0, 2.31, 0.0)}
    assert choose(worse, ["both", "text", UNIFORM])[0] == UNIFORM


def test_candidates_are_distinct_plans_within_budget(tiny) -> None:
    loaded, _ = tiny
    arch = loaded.arch
    from kvcompile.memory import plan_memory_ratio

    request = FitSettings(kv_budget=0.25, at_context=256, min_window=4, min_budgeted_capacity=16)
    pool = candidates(random_stats(arch.n_layers, arch.n_kv_heads, 0), arch, request)
    plans = [c.result.plan for c in pool]
    assert len(set(plans)) == len(plans) >= 2
    assert pool[-1].name == UNIFORM and plans[-1].policy == "uniform"
    assert all(plan_memory_ratio(p, arch, 256) <= 0.25 for p in plans)


def test_candidates_measure_the_proxy_heads_at_every_other_selected_share(tiny) -> None:
    """The split of a budgeted head's free slots (selected vs window) is measured, not assumed."""
    loaded, _ = tiny
    arch = loaded.arch
    stats = random_stats(arch.n_layers, arch.n_kv_heads, 0)
    for own, measured in ((0.5, SELECTED_FRACTIONS), (0.25, SELECTED_FRACTIONS), (0.3, (0.3,))):
        request = FitSettings(kv_budget=0.25, at_context=256, min_window=4, min_budgeted_capacity=16,
                             selected_fraction=own)
        pool = candidates(stats, arch, request)
        proxy = pool[0].result.plan
        splits = {c.request.selected_fraction: c.result.plan for c in pool
                  if c.request.full_heads is None and c.request.policy == "profiled" and not c.result.plan.quantized}
        assert sorted(splits) == sorted(measured)  # a share the user set is not second-guessed
        for fraction, plan in splits.items():
            assert [layer.full_heads for layer in plan.layers] == [layer.full_heads for layer in proxy.layers]
            for layer in plan.layers:
                layout = layer.layout
                free = layout.capacity - layout.sinks - layout.compensation
                assert layout.selected == round(fraction * free), (fraction, layout)


def test_choose_holds_quantized_candidates_to_the_best_full_precision_one() -> None:
    """A quantized candidate must beat uniform *and* the best full-precision candidate on both
    losses; full-precision ones only uniform, as before. By hand, uniform's losses (2.0, 0.3)."""
    base = Losses(1.0, 2.0, 0.0)
    losses = {
        UNCOMPRESSED: base,
        UNIFORM: Losses(3.0, 2.2, 0.10),  # score 1
        "exact": Losses(2.0, 2.1, 0.11),  # (1.0, 0.21): 0.5 x 0.5 + 0.5 x 0.7 = 0.6, the best full precision
        "q-lower-score": Losses(1.4, 2.1, 0.12),  # (0.4, 0.22): 0.1 + 0.367 = 0.467 but text above exact's
        "q-both": Losses(1.8, 2.1, 0.10),  # (0.8, 0.2): 0.2 + 0.333 = 0.533, both below exact's: the winner
    }
    names = ["exact", "q-lower-score", "q-both", UNIFORM]
    chosen, table = choose(losses, names, full_precision=["exact", UNIFORM])
    assert not table["q-lower-score"]["eligible"] and table["q-both"]["eligible"]
    assert table["q-lower-score"]["score"] == pytest.approx(0.5 * 0.4 / 2.0 + 0.5 * 0.22 / 0.3)
    assert chosen == "q-both"
    # without the precision rule the lower score would win: the rule is what keeps it out
    assert choose(losses, names)[0] == "q-lower-score"
    # a tie on score goes to full precision
    tied = {**losses, "q-both": losses["exact"]}
    assert choose(tied, names, full_precision=["exact", UNIFORM])[0] == "exact"
    # no full-precision candidate but uniform eligible: quantized ones are held to uniform's losses
    alone = {**losses, "exact": Losses(9.0, 9.0, 9.0)}
    assert choose(alone, names, full_precision=["exact", UNIFORM])[0] == "q-lower-score"
    with pytest.raises(ValueError, match="uniform"):
        choose(losses, names, full_precision=["exact"])


def test_candidates_add_each_variant_in_each_quantized_storage_at_the_same_bytes(tiny) -> None:
    """The full-precision candidates are today's; each comes again in every storage of
    ``STORAGE_CHOICES`` (the plans that differ), all within the bytes; none when the user set a
    storage; ``uniform`` last, in full precision."""
    from kvcompile.memory import budget_bytes, plan_bytes
    from kvcompile.plan import Storage

    loaded, _ = tiny
    arch = loaded.arch
    request = FitSettings(kv_budget=0.25, at_context=256, min_window=4, min_budgeted_capacity=16)
    pool = candidates(random_stats(arch.n_layers, arch.n_kv_heads, 0), arch, request)
    exact = [c for c in pool if not c.result.plan.quantized]
    quantized = [c for c in pool if c.result.plan.quantized]
    assert exact[-1].name == UNIFORM == pool[-1].name
    variants = 1 + 2 + 2 + 1  # proxy, two full-head counts by score, two by needle mass, one split
    assert len(pool) <= variants * (1 + len(STORAGE_CHOICES)) + 1
    storages = {(c.request.full_storage, c.request.budget_storage) for c in quantized}
    assert storages == {(Storage.parse(f), Storage.parse(b)) for f, b in STORAGE_CHOICES}
    for c in quantized:  # a full-precision variant's settings but the storages
        full, budgeted = c.name.rsplit(", ", 1)[1].split("/")
        assert (c.request.full_storage, c.request.budget_storage) == (Storage.parse(full), Storage.parse(budgeted))
        assert all(layer.budget_storage == c.request.budget_storage for layer in c.result.plan.layers)
    assert all(plan_bytes(c.result.plan, arch, 256) <= budget_bytes(arch, 256, 0.25) for c in pool)
    assert max(c.result.plan.kv_slots(256) for c in quantized) > max(c.result.plan.kv_slots(256) for c in exact)
    own = candidates(random_stats(arch.n_layers, arch.n_kv_heads, 0), arch,
                     request.with_values(budget_storage="k8v8"))
    assert all(c.request.budget_storage == Storage(8, 8) for c in own)


@pytest.mark.slow
def test_smollm2_measured_choice_beats_uniform_on_its_held_out_prompts(smollm2) -> None:
    """The real model and the shipped profile's statistics, small held-out prompts, three budgets."""
    from kvcompile.fit.pipeline import stats_from_profile
    from kvcompile.profile.record import load_profile

    model = smollm2.build()
    stats = stats_from_profile(load_profile("profiles/smollm2-135m-instruct.yaml"))
    # one quantized storage pair: each candidate is served on every prompt, quantized ones slower
    config = ChoiceConfig(length=512, n_passkey=1, n_multikey=1, n_text=1, text_tokens=32,
                          storages=(("k8v4", "k8v4"),))
    prompts = held_out_prompts(smollm2.tokenizer, config)
    for budget in (1 / 4, 1 / 8, 1 / 16):  # the tiny model's test takes every budget of SWEEP
        request = FitSettings(kv_budget=budget, at_context=4096)
        result, record = choose_plan(model, smollm2.tokenizer, stats, request, config)
        uniform = fit(None, smollm2.arch, FitSettings(kv_budget=budget, at_context=4096, policy="uniform"))
        mine = reference_losses(model, result.plan, prompts)
        theirs = reference_losses(model, uniform.plan, prompts)
        assert mine[0] <= theirs[0] + 1e-4, (budget, record["chosen"], mine, theirs)
        assert mine[1] + mine[2] <= theirs[1] + theirs[2] + 1e-4, (budget, record["chosen"], mine, theirs)
