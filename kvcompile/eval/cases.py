"""A team's own evaluation cases (``kvcompile eval --cases FILE.jsonl``).

One JSON object per line, either a question with accepted answers::

    {"context": "...", "question": "...", "answers": ["42", "forty-two"]}

or a text and its real continuation, scored by NLL and KL like the generated task::

    {"context": "...", "continuation": "..."}

The context is prefilled and compressed, then the question (or continuation) goes through the
same static-budget cache, as for the generated tasks. Context and question are tokenized
separately (the question as written: start it with a space or newline if it should follow
the context that way). Question cases report as task ``answers``, continuations as task
``continuation``, one row each at the longest context, so gate rules name them as usual.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcompile.errors import KVCompileError
from kvcompile.eval.report import CONTINUATION_TASK
from kvcompile.eval.tasks import EvalCase
from kvcompile.textsource import bos_prefix, encode_text

ANSWERS_TASK = "answers"


class CasesError(KVCompileError):
    """A cases file that cannot be read: names the line and the field."""


@dataclass(frozen=True)
class RawCase:
    line: int
    context: str
    question: str = ""
    answers: tuple[str, ...] = ()
    continuation: str = ""


def read_cases(path: Path) -> list[RawCase]:
    """Parse and check every line before anything is loaded; errors name the line and field."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise CasesError(f"{path}: cases must be a .jsonl file (one JSON object per line)")
    if not path.is_file():
        raise CasesError(f"cases file {path} does not exist: check the path")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CasesError(f"{path} is not UTF-8 (bad byte at offset {err.start}): save it as UTF-8") from None
    cases = [_parse_line(path, number, line) for number, line in enumerate(text.splitlines(), start=1)
             if line.strip()]
    if not cases:
        raise CasesError(f"{path} has no cases: write one JSON object per line")
    return cases


def _parse_line(path: Path, number: int, line: str) -> RawCase:
    where = f"{path}: line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise CasesError(f"{where}: not valid JSON ({err.msg}); write one object per line") from None
    if not isinstance(record, dict):
        raise CasesError(f"{where}: expected a JSON object, got {type(record).__name__}")
    known = {"context", "question", "answers", "continuation"}
    unknown = sorted(set(record) - known)
    if unknown:
        raise CasesError(f"{where}: unknown field {unknown[0]!r}; fields are context, question, answers, continuation")
    context = _text(record, "context", where)
    if "continuation" in record:
        if "question" in record or "answers" in record:
            raise CasesError(f"{where}: give either question + answers or continuation, not both")
        return RawCase(number, context, continuation=_text(record, "continuation", where))
    question = _text(record, "question", where)
    answers = record.get("answers")
    if answers is None:
        raise CasesError(f"{where}: missing field 'answers' (a list of accepted answer strings)")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise CasesError(f"{where}: field 'answers' must be a non-empty list of non-empty strings")
    return RawCase(number, context, question, tuple(a.strip() for a in answers))


def _text(record: dict[str, Any], name: str, where: str) -> str:
    if name not in record:
        raise CasesError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise CasesError(f"{where}: field {name!r} must be a non-empty string")
    return value


def tokenize_cases(tokenizer: Any, raw: list[RawCase], path: Path, max_tokens: int, extra_tokens: int) -> list[EvalCase]:
    """EvalCases (``length`` = context tokens); a case over ``max_tokens`` with its
    ``extra_tokens`` of generation is refused with its line number."""
    bos = bos_prefix(tokenizer)
    cases = []
    for case in raw:
        context = tuple(bos + encode_text(tokenizer, case.context))
        if case.continuation:
            continuation = tuple(encode_text(tokenizer, case.continuation))
            if len(continuation) < 2:
                raise CasesError(f"{path}: line {case.line}: field 'continuation' needs at least 2 tokens")
            item = EvalCase(CONTINUATION_TASK, len(context), 0.0, context, (), "", continuation)
            total = len(context) + len(continuation) + extra_tokens
        else:
            question = tuple(encode_text(tokenizer, case.question))
            item = EvalCase(ANSWERS_TASK, len(context), 0.0, context, question, case.answers[0],
                            answers=case.answers)
            total = len(context) + len(question) + extra_tokens
        if total > max_tokens:
            raise CasesError(f"{path}: line {case.line}: {total} tokens with the question or continuation and "
                             f"generated tokens, more than the context of {max_tokens}; shorten field 'context'")
        cases.append(item)
    return cases
