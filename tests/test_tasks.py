"""Evaluation cases and answer scoring."""
from __future__ import annotations

import pytest

from kvcompile.eval.tasks import (
    CONTINUATION_TOKENS,
    TASKS,
    EvalCase,
    build_cases,
    depth_grid,
    score_answer,
)
from kvcompile.textsource import calibration_paragraphs, encode_text, evaluation_paragraphs
from tests.test_calibration import BosCharTokenizer, CharTokenizer

PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


def _case(answer: str = "73841", task: str = "passkey") -> EvalCase:
    return EvalCase(task, 10, 0.5, (1,) * 10, (2,), answer)


# ----------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    ("generated", "correct"),
    [
        ("73841", True),
        (" 73841.", True),
        ("\n 73841\nWhat", True),
        (" The pass key is 73841. Remember it.", True),
        (" 73841 73841", True),
        (" 73841, and later 12345", True),
        (" 12345, then 73841", False),
        (" 738410", False),
        (" 7384", False),
        (" 7 3 8 4 1", False),
        (" seventy-three thousand", False),
        ("", False),
    ],
)
def test_score_numeric_answer(generated: str, correct: bool):
    assert score_answer(generated, _case()) is correct


def test_score_non_numeric_answer_and_continuation():
    assert score_answer("  Blue whale.", _case("blue whale"))
    assert not score_answer("a blue whale", _case("blue whale"))
    with pytest.raises(ValueError, match="NLL"):
        score_answer("anything", _case("", "continuation"))


# ----------------------------------------------------------------- cases


def test_depth_grid():
    assert depth_grid(1) == [0.5]
    assert depth_grid(5) == [0.1, 0.3, 0.5, 0.7, 0.9]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("tokenizer_cls", [CharTokenizer, BosCharTokenizer])
def test_context_length_is_exact(task: str, tokenizer_cls):
    tok = tokenizer_cls()
    cases = build_cases(tok, task, [300, 1000], samples=3, seed=0)
    depths = (0.0,) * 3 if task == "continuation" else (0.1, 0.5, 0.9)
    assert [(c.length, c.depth) for c in cases] == [(n, d) for n in (300, 1000) for d in depths]
    for case in cases:
        assert case.task == task and len(case.context_ids) == case.length
        if tokenizer_cls is BosCharTokenizer:
            assert case.context_ids[0] == 1 and 1 not in case.context_ids[1:]
        if task == "continuation":
            assert len(case.continuation_ids) == CONTINUATION_TOKENS and case.question_ids == ()
        else:
            assert case.answer in tok.decode(case.context_ids)
            assert case.answer not in tok.decode(case.question_ids)


def test_passkey_case_text():
    tok = CharTokenizer()
    (case,) = build_cases(tok, "passkey", [400], samples=1, seed=5)
    text = tok.decode(case.context_ids)
    assert text.startswith("There is an important pass key hidden inside a lot of irrelevant text.")
    assert f"The pass key is {case.answer}. Remember it. {case.answer} is the pass key." in text
    assert tok.decode(case.question_ids) == PASSKEY_QUESTION + " "  # the answer's leading space
    assert len(case.answer) == 5 and case.answer.isdigit()
    needle_at = text.index("The pass key is") / len(text)
    assert 0.3 < needle_at < 0.65  # depth 0.5 after the instruction, snapped to a sentence end


def test_multikey_case_asks_one_of_several_needles():
    tok = CharTokenizer()
    for case in build_cases(tok, "multikey", [1200], samples=5, seed=2):
        text = tok.decode(case.context_ids)
        assert text.count("The secret code for ") == 4
        question = tok.decode(case.question_ids)
        key = question.split("secret code for ")[1].split("?")[0]
        assert question == f"\nWhat is the secret code for {key}? The secret code for {key} is "
        assert f"The secret code for {key} is {case.answer}." in text


def test_cases_are_deterministic_and_seeded():
    tok = CharTokenizer()
    for task in TASKS:
        first = build_cases(tok, task, [256, 512], samples=2, seed=11)
        assert first == build_cases(tok, task, [256, 512], samples=2, seed=11)
        other = build_cases(tok, task, [256, 512], samples=2, seed=12)
        assert all(a.context_ids != b.context_ids for a, b in zip(first, other, strict=True))
        assert len({c.context_ids for c in first}) == len(first)


def test_tasks_do_not_share_needles():
    tok = CharTokenizer()
    passkeys = {c.answer for c in build_cases(tok, "passkey", [300], samples=9, seed=0)}
    multikey = build_cases(tok, "multikey", [600], samples=9, seed=0)
    values = {v for c in multikey for v in _numbers(tok.decode(c.context_ids), "The secret code for ")}
    assert len(passkeys) == 9 and len(values) == 36
    assert not passkeys & values


def _numbers(text: str, marker: str) -> list[str]:
    return [part.split(" is ", 1)[1].split(".")[0] for part in text.split(marker)[1:]]


def test_continuation_is_real_following_evaluation_text():
    tok = CharTokenizer()
    eval_text = "\n".join(evaluation_paragraphs() * 2)
    calib_text = "\n".join(calibration_paragraphs())
    for case in build_cases(tok, "continuation", [500], samples=2, seed=3):
        whole = tok.decode(case.context_ids + case.continuation_ids)
        assert whole in eval_text and whole[:200] not in calib_text


def test_bad_arguments():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="unknown task"):
        build_cases(tok, "summary", [100], 1, 0)
    with pytest.raises(ValueError, match="too short"):
        build_cases(tok, "passkey", [50], 1, 0)
    with pytest.raises(ValueError, match="samples"):
        build_cases(tok, "passkey", [500], 0, 0)


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_cases_on_the_real_tokenizer(tokenizer, task: str):
    cases = build_cases(tokenizer, task, [512, 8192], samples=2, seed=0)
    assert len(cases) == 4
    for case in cases:
        assert len(case.context_ids) == case.length
        if task == "continuation":
            assert len(case.continuation_ids) == CONTINUATION_TOKENS
            continue
        text = tokenizer.decode(list(case.context_ids))
        assert text.startswith("There ")
        assert f" is {case.answer}." in text
        question = tokenizer.decode(list(case.question_ids))
        assert question.endswith(" is ") and "\n" in question  # SmolLM2 splits " " off a number
        # the question ends with the very token the answer " <number>" starts with
        assert encode_text(tokenizer, " " + case.answer)[0] == case.question_ids[-1]
    if task == "passkey":
        assert tokenizer.decode(list(cases[0].question_ids)) == PASSKEY_QUESTION + " "
