"""Evaluation cases, generated deterministically from a seed on evaluation text only.

The context is prefilled and compressed; the question is fed afterwards through the same
static-budget cache, so a compression cannot peek at the question. Passkeys and
multi-key values come from disjoint number ranges, so cases of different tasks never
share a needle.

The question ends with the answer's leading whitespace token when the tokenizer splits
one off (SmolLM2 writes " 28324" as " " + digits): "... The pass key is " + the number.
Without it a small model often continues "The pass key is" with " a special method ..."
although it would have copied the right digits after the space: the case would measure
the choice to write a number, which compression does not touch, instead of retrieval.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from kvcompile.profile.calibration import build_probe, multikey_spec, passkey_spec
from kvcompile.textsource import bos_prefix, genre_paragraphs, haystack_ids

TASKS = ("passkey", "multikey", "continuation")
CONTINUATION_TOKENS = 64
PASSKEY_RANGE = (10000, 50000)  # 5 digits; disjoint from MULTIKEY_RANGE
MULTIKEY_RANGE = (50000, 100000)
MULTIKEY_KEYS = 4
DEPTH_RANGE = (0.1, 0.9)

_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class EvalCase:
    """One evaluation case; ``context_ids`` has exactly ``length`` tokens."""

    task: str
    length: int
    depth: float
    context_ids: tuple[int, ...]
    question_ids: tuple[int, ...]
    answer: str
    continuation_ids: tuple[int, ...] = ()
    answers: tuple[str, ...] = ()  # every accepted answer (user cases); empty: just ``answer``

    @property
    def accepted(self) -> tuple[str, ...]:
        return self.answers or (self.answer,)


def depth_grid(samples: int) -> list[float]:
    """``samples`` depths spread evenly over DEPTH_RANGE (0.5 for a single sample)."""
    low, high = DEPTH_RANGE
    if samples == 1:
        return [round((low + high) / 2, 4)]
    return [round(low + (high - low) * i / (samples - 1), 4) for i in range(samples)]


def build_cases(tokenizer: Any, task: str, lengths: list[int], samples: int, seed: int,
                genre: str = "pydoc") -> list[EvalCase]:
    """``samples`` cases per length (depths over the grid), in order length-major, on ``genre`` text."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    paragraphs = genre_paragraphs(genre)
    depths = depth_grid(samples)
    cases = []
    for length in lengths:
        if length < 1:
            raise ValueError(f"context lengths must be >= 1, got {length}")
        for i, depth in enumerate(depths):
            key = f"{seed}:{task}:{length}:{i}"
            if task == "continuation":
                cases.append(_continuation_case(tokenizer, paragraphs, length, key))
            else:
                cases.append(_needle_case(tokenizer, paragraphs, task, length, depth, key))
    return cases


def _needle_case(
    tokenizer: Any, paragraphs: list[str], task: str, length: int, depth: float, key: str
) -> EvalCase:
    rng = random.Random(key)
    if task == "passkey":
        spec = passkey_spec(str(rng.randrange(*PASSKEY_RANGE)), depth)
    else:
        spec = multikey_spec(rng, depth, MULTIKEY_KEYS, MULTIKEY_RANGE)
    probe = build_probe(tokenizer, paragraphs, spec, length, f"{key}:filler")
    lead = probe.answer_offsets[0] if probe.answer_offsets else 0  # whitespace-only answer tokens
    question = probe.question_ids + probe.answer_ids[:lead]
    return EvalCase(task, length, depth, probe.context_ids, question, probe.answer)


def _continuation_case(tokenizer: Any, paragraphs: list[str], length: int, key: str) -> EvalCase:
    """Real text cut into a context and the CONTINUATION_TOKENS that really follow it."""
    bos = bos_prefix(tokenizer)
    n_text = length - len(bos)
    ids = haystack_ids(tokenizer, paragraphs, n_text + CONTINUATION_TOKENS, key)
    context = tuple(bos + ids[:n_text])
    return EvalCase("continuation", length, 0.0, context, (), "", tuple(ids[n_text:]))


def score_answer(generated_text: str, case: EvalCase) -> bool:
    """Whether the generation answers the case.

    Rule (numeric answers): surrounding whitespace is stripped and the first maximal run
    of digits must equal the expected number exactly. Text before it is allowed
    ("The pass key is 73841." is right); another number first, a longer or shorter
    number ("738410", "7384"), digits split by spaces ("7 3 8 4 1" reads as 7) or no
    number at all are wrong. Not splitting on whitespace keeps "73841 73841" right.
    Non-numeric answers must start the stripped text (case-insensitive). A case with several
    accepted answers is right when any of them is. Continuation cases are scored by NLL, not
    here: they raise ValueError.
    """
    if case.task == "continuation" or not case.answer:
        raise ValueError("continuation cases are scored by NLL, not by score_answer")
    text = generated_text.strip()
    return any(_matches(text, answer) for answer in case.accepted)


def _matches(text: str, answer: str) -> bool:
    if answer.isdigit():
        match = _NUMBER.search(text)
        return match is not None and match.group(0) == answer
    return text.lower().startswith(answer.strip().lower())
