"""The report's numbers against an independent computation on a tiny random model.

Reference: one plain forward pass over the whole token sequence, no cache and no runtime
op: the compact decoder's blocks with softmax attention under an explicit mask that spells
the cache semantics out (plain causal for the baseline; for a budgeted head, prompt
positions attend causally to everything and a later position to the sinks and the last
``window`` positions, itself included). The harness is itself checked against the
transformers model. NLL, KL, greedy agreement and accuracy are then computed here, in the
test, and compared with the report to 1e-6 (float64 weights, so that this tolerance
measures the bookkeeping, not the arithmetic).

The metric functions themselves (``kvcompile.metrics``) are checked at the end against plain
Python arithmetic on hand-made distributions.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import kvcompile.eval.evaluate as evaluate_module
from kvcompile.eval.evaluate import EvalConfig, evaluate_systems
from kvcompile.eval.report import AccuracyRow, ContinuationRow
from kvcompile.eval.tasks import EvalCase
from kvcompile.metrics import greedy_agreement, greedy_token, kl, log_probs, nll, nll_increase
from kvcompile.models import LoadedModel
from kvcompile.plan import BudgetLayout, LayerPlan, Plan, Selection
from kvcompile.runtime.engine import Engine
from tests.test_stats import wilson_by_quadratic
from tests.tiny import VOCAB, state_of, tiny_hf_model

LENGTH = 64  # context tokens (EvalConfig's minimum)
TOKENS = 12  # continuation tokens scored
AGREEMENT = 5
SINKS, WINDOW = 2, 8  # the budgeted head's layout: far below the context, so it bites
EOS = VOCAB - 1
ALPHABET = "0123456789 "  # the fake tokenizer writes token i as ALPHABET[i % 11]


class DigitTokenizer:
    """Decodes ids to digits and spaces, so greedy generations are scoreable numbers."""

    eos_token_id = EOS

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(ALPHABET[i % len(ALPHABET)] for i in ids if not (skip_special_tokens and i == EOS))


@pytest.fixture(scope="module")
def tiny():
    hf = tiny_hf_model("llama", seed=11).double()
    from kvcompile.arch import arch_from_config

    loaded = LoadedModel("tiny", "tiny", hf.config, None, state_of(hf), arch_from_config(hf.config))
    assert loaded.arch.n_layers == 2 and loaded.arch.n_kv_heads == 4
    # layer 0 all full; layer 1 budgets KV head 0 (so the served order, 1 2 3 0, is not the
    # identity). Milder plans leave the greedy tokens of a random model too fragile to agree.
    plan = Plan((LayerPlan((0, 1, 2, 3), (), None),
                 LayerPlan((1, 2, 3), (0,), BudgetLayout(SINKS, 0, 0, WINDOW))), selection=Selection("key_norm"))
    model = loaded.build()
    assert model.dtype == torch.float64
    engine = Engine(model, plan, DigitTokenizer(), max_context=256, eos_token_ids=(EOS,))
    return hf, model, plan, engine


def _ids(seed: int, n: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(int(t) for t in torch.randint(3, EOS, (n,), generator=gen))


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    """The transformers model, one forward, [T, V]: checks the harness below."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """The uncompressed reference: plain causal attention everywhere, [T, V]."""
    return masked_logits(model, None, ids, prompt=len(ids))


def masked_logits(model, plan: Plan | None, ids: list[int], prompt: int) -> torch.Tensor:
    """The compressed reference: plain attention under the cache's visibility mask, [T, V].

    Position ``i`` of a budgeted KV head sees ``j <= i`` while ``i`` is a prompt position;
    afterwards only the first SINKS positions and the last WINDOW ones (``i - WINDOW < j``).
    """
    arch = model.arch
    t = len(ids)
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    causal = j <= i
    budgeted_mask = causal & ((i < prompt) | (j < SINKS) | (j > i - WINDOW))

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        group = q.shape[1] // k.shape[1]
        full = set(range(k.shape[1])) if plan is None else set(plan.layers[layer].full_heads)
        masks = torch.stack([causal if kv in full else budgeted_mask for kv in range(k.shape[1])])
        masks = masks.repeat_interleave(group, dim=0)  # per query head
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) * arch.attention_scale
        scores = scores.masked_fill(~masks, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    with torch.no_grad():
        hidden = model.hidden_states(torch.tensor([ids]), torch.arange(t), attend)
        return model.logits(hidden)[0]


def test_the_masked_reference_is_the_model(tiny) -> None:
    """With nothing evicted the masked reference computes what the transformers model does
    (to its RoPE's float32 rounding); with evictions it does not."""
    hf, model, plan, _ = tiny
    ids = list(_ids(0, 40))
    torch.testing.assert_close(full_logits(model, ids), hf_logits(hf, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(masked_logits(model, plan, ids, prompt=40), full_logits(model, ids),
                               atol=1e-12, rtol=0)
    assert (masked_logits(model, plan, ids, prompt=10) - full_logits(model, ids)).abs().max() > 1e-3


def _continuation_cases(n: int) -> list[EvalCase]:
    return [EvalCase("continuation", LENGTH, 0.0, _ids(100 + i, LENGTH), (), "", _ids(200 + i, TOKENS))
            for i in range(n)]


def _reference_continuation(hf, model, plan: Plan, case: EvalCase) -> dict[str, float]:
    ctx, cont = list(case.context_ids), list(case.continuation_ids)
    seq = ctx + cont
    rows = slice(LENGTH - 1, LENGTH + TOKENS - 1)  # logits at position p predict token p + 1
    target = torch.tensor(cont)
    base = torch.log_softmax(full_logits(model, seq)[rows], -1)
    art = torch.log_softmax(masked_logits(model, plan, seq, LENGTH)[rows], -1)
    nll_base = float(-base.gather(1, target[:, None]).mean())
    nll_art = float(-art.gather(1, target[:, None]).mean())
    kl = float((base.exp() * (base - art)).sum(-1).clamp_min(0).mean())
    # agreement: from the continuation's last position on, the baseline writes greedily and
    # the artifact is teacher-forced on its tokens
    prefix = ctx + cont[:-1]
    greedy: list[int] = []
    for _ in range(AGREEMENT):
        greedy.append(int(full_logits(model, prefix + greedy)[-1].argmax()))
    seq = prefix + greedy[:-1]
    art_logits = masked_logits(model, plan, seq, LENGTH)[len(prefix) - 1:]
    agreed = sum(int(art_logits[s].argmax()) == greedy[s] for s in range(AGREEMENT))
    return {"nll_base": nll_base, "nll_art": nll_art, "kl": kl, "agreement": agreed / AGREEMENT}


def test_continuation_metrics_match_a_plain_forward(tiny, monkeypatch) -> None:
    hf, model, plan, engine = tiny
    cases = _continuation_cases(5)
    monkeypatch.setattr(evaluate_module, "build_cases", lambda *args: cases)
    config = EvalConfig(tasks=("continuation",), lengths=(LENGTH,), samples=len(cases), seed=0,
                        agreement_tokens=AGREEMENT)
    row = evaluate_systems(engine, {"artifact": plan.to_served(permuted_by=None)}, config)["artifact"].rows[0]
    assert isinstance(row, ContinuationRow)
    refs = [_reference_continuation(hf, model, plan, case) for case in cases]
    tol = 1e-6
    assert row.cases.baseline_nll == pytest.approx([r["nll_base"] for r in refs], abs=tol)
    assert row.cases.artifact_nll == pytest.approx([r["nll_art"] for r in refs], abs=tol)
    assert row.cases.kl == pytest.approx([r["kl"] for r in refs], abs=tol)
    assert row.cases.agreement == pytest.approx([r["agreement"] for r in refs], abs=tol)
    base_nll = sum(r["nll_base"] for r in refs) / len(refs)
    art_nll = sum(r["nll_art"] for r in refs) / len(refs)
    assert row.baseline.nll == pytest.approx(base_nll, abs=tol)
    assert row.artifact.nll == pytest.approx(art_nll, abs=tol)
    assert row.nll_increase == pytest.approx(art_nll / base_nll - 1, abs=tol)
    assert row.kl == pytest.approx(sum(r["kl"] for r in refs) / len(refs), abs=tol)
    agreement = sum(r["agreement"] for r in refs) / len(refs)
    assert row.agreement == pytest.approx(agreement, abs=tol)
    assert row.agreement_n == AGREEMENT * len(cases) and row.tokens == TOKENS
    # the comparison has teeth: compression changed every number it is checked on
    assert row.kl > 1e-3 and abs(row.nll_increase) > 1e-3
    assert len({r["agreement"] for r in refs}) > 1 and 0 < agreement < 1


# ----------------------------------------------------------------------------- accuracy

_NUMBER = re.compile(r"\d+")


def _reference_answer(hf, model, plan: Plan, case: EvalCase, compressed: bool) -> str:
    """Greedy answer text, recomputing the whole sequence each step; stops at EOS."""
    seq = list(case.context_ids) + list(case.question_ids)
    out: list[int] = []
    for _ in range(evaluate_module.ANSWER_TOKENS):
        logits = masked_logits(model, plan, seq + out, LENGTH) if compressed else full_logits(model, seq + out)
        token = int(logits[-1].argmax())
        if token == EOS:
            break
        out.append(token)
    return DigitTokenizer().decode(out, skip_special_tokens=True)


def _first_number(text: str) -> str | None:
    match = _NUMBER.search(text.strip())
    return match.group(0) if match else None


def test_accuracy_matches_hand_made_answers(tiny, monkeypatch) -> None:
    hf, model, plan, engine = tiny
    blanks = [EvalCase("passkey", LENGTH, 0.5, _ids(300 + i, LENGTH), _ids(400 + i, 3), "")
              for i in range(6)]
    base_texts = [_reference_answer(hf, model, plan, c, compressed=False) for c in blanks]
    art_texts = [_reference_answer(hf, model, plan, c, compressed=True) for c in blanks]
    # hand-made answers: even cases expect what the baseline writes, odd ones a number it
    # does not write (its own number with a 9 appended)
    answers = []
    for i, text in enumerate(base_texts):
        number = _first_number(text)
        assert number is not None, f"case {i}: the baseline wrote no digits ({text!r}); pick other seeds"
        answers.append(number if i % 2 == 0 else number + "9")
    cases = [EvalCase(c.task, c.length, c.depth, c.context_ids, c.question_ids, a)
             for c, a in zip(blanks, answers, strict=True)]
    monkeypatch.setattr(evaluate_module, "build_cases", lambda *args: cases)
    config = EvalConfig(tasks=("passkey",), lengths=(LENGTH,), samples=len(cases), seed=0)
    row = evaluate_systems(engine, {"artifact": plan.to_served(permuted_by=None)}, config)["artifact"].rows[0]
    assert isinstance(row, AccuracyRow)
    n = len(cases)
    base_right = sum(_first_number(t) == a for t, a in zip(base_texts, answers, strict=True))
    art_right = sum(_first_number(t) == a for t, a in zip(art_texts, answers, strict=True))
    assert base_right == 3  # by construction
    for side, right in ((row.baseline, base_right), (row.artifact, art_right)):
        assert side.correct == right
        assert side.accuracy == pytest.approx(right / n, abs=1e-6)
        assert side.ci95 == pytest.approx(wilson_by_quadratic(right, n), abs=1e-6)
    assert row.n == n
    assert art_texts != base_texts, "the compressed cache must change some answer for this test to bite"


def test_reference_helpers_agree_on_an_uncompressed_plan(tiny) -> None:
    """Sanity of the harness: a plan with every head full evicts nothing."""
    _, model, plan, _ = tiny
    full = Plan(tuple(LayerPlan(tuple(range(model.arch.n_kv_heads)), (), None) for _ in plan.layers))
    ids = list(_ids(5, 70))
    assert torch.equal(masked_logits(model, full, ids, prompt=10), full_logits(model, ids))


# ----------------------------------------------------------------------------- the metric functions

# Hand-made distributions over 4 tokens, one row per scored position.
P = [[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.05, 0.05, 0.6, 0.3]]
Q = [[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.05, 0.15, 0.5, 0.3]]


def _logp(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in row] for row in rows], dtype=torch.float64)


def _textbook_kl(p: list[list[float]], q: list[list[float]]) -> float:
    """Mean over rows of Σ_v p log(p / q), in Python floats."""
    return sum(sum(a * math.log(a / b) for a, b in zip(pr, qr, strict=True))
               for pr, qr in zip(p, q, strict=True)) / len(p)


def test_log_probs_are_a_float32_log_softmax() -> None:
    logits = [[2.0, -1.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0]]
    out = log_probs(torch.tensor(logits, dtype=torch.float64))
    assert out.dtype == torch.float32
    for row, got in zip(logits, out.tolist(), strict=True):
        norm = math.log(sum(math.exp(x) for x in row))
        assert got == pytest.approx([x - norm for x in row], abs=1e-6)
    assert log_probs(torch.tensor(logits, dtype=torch.bfloat16)).dtype == torch.float32


def test_nll_is_minus_log_p_of_the_targets() -> None:
    targets = [0, 3, 2]
    expected = -sum(math.log(row[t]) for row, t in zip(P, targets, strict=True)) / len(P)
    assert nll(_logp(P), torch.tensor(targets)) == pytest.approx(expected, abs=1e-12)
    # another target per row changes it: the right column is read
    assert nll(_logp(P), torch.tensor([1, 3, 2])) == pytest.approx(
        -(math.log(0.1) + math.log(0.25) + math.log(0.6)) / 3, abs=1e-12)


def test_nll_increase_is_relative_to_the_baseline() -> None:
    assert nll_increase(2.2, 2.0) == pytest.approx(0.1, abs=1e-12)
    assert nll_increase(1.5, 2.0) == pytest.approx(-0.25, abs=1e-12)
    assert nll_increase(2.0, 2.0) == 0.0


def test_kl_matches_the_textbook_sum_and_is_zero_on_identical_rows() -> None:
    assert kl(_logp(P), _logp(Q)) == pytest.approx(_textbook_kl(P, Q), abs=1e-12)
    # the reference comes first: KL(P || Q), not KL(Q || P)
    assert kl(_logp(Q), _logp(P)) == pytest.approx(_textbook_kl(Q, P), abs=1e-12)
    assert abs(_textbook_kl(P, Q) - _textbook_kl(Q, P)) > 1e-3
    assert kl(_logp(P), _logp(P)) == 0.0
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    assert kl(log_probs(logits), log_probs(logits)) == 0.0


def test_kl_clamps_each_row_at_zero() -> None:
    """A row whose sum comes out negative (not a distribution here; float rounding on nearly
    equal rows in practice) counts 0, and the other rows still count in full."""
    ref = _logp(P)
    system = ref.clone()
    system[0] += 0.1  # row 0: Σ p (log p - log p - 0.1) = -0.1 before the clamp
    system[1:] = _logp(Q)[1:]
    expected = (0.0 + 2 * _textbook_kl(P[1:], Q[1:])) / 3
    assert kl(ref, system) == pytest.approx(expected, abs=1e-12)


def test_greedy_agreement_counts_rows_with_the_same_argmax() -> None:
    reference = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.0, 0.1, 0.2],
                              [1.0, 0.0, 0.0], [0.2, 0.3, 0.1]])
    system = torch.tensor([[0.0, 0.8, 0.1], [0.1, 0.7, 0.2], [0.3, 0.1, 0.9],
                           [0.6, 0.1, 0.2], [0.9, 0.0, 0.0]])
    # argmax per row: reference 1 0 2 0 1, system 1 1 2 0 0: rows 0, 2, 3 agree
    assert greedy_agreement(reference, system) == 3 / 5
    assert greedy_agreement(reference[None], system[None]) == 3 / 5  # leading batch axis
    assert greedy_agreement(reference, reference) == 1.0
    assert [greedy_token(row) for row in reference] == [1, 0, 2, 0, 1]
    assert greedy_token(torch.tensor([0.5, 2.0, 2.0])) == 1  # a tie: the first index


def test_the_metric_formulas_are_written_once() -> None:
    """Every stage scores through ``kvcompile.metrics``: no other module of the package writes
    a log-softmax, the KL sum or an argmax comparison of its own."""
    root = Path(__file__).resolve().parents[1]
    patterns = ("log_softmax(", ".clamp_min(0).mean()", "argmax(-1) ==")
    sources = [*(root / "kvcompile").rglob("*.py"), *(root / "runtime").glob("*.py")]
    offenders = [f"{path.relative_to(root)}: {pattern}" for path in sources if path.name != "metrics.py"
                 for pattern in patterns if pattern in path.read_text()]
    assert offenders == []
