"""Calibration text, probes and user prompt files."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kvcompile.errors import CalibrationError
from kvcompile.profile.calibration import (
    MIN_USER_TOKENS,
    CalibConfig,
    CalibPrompt,
    build_calibration_set,
    read_user_prompts,
)
from kvcompile.textsource import (
    calibration_paragraphs,
    evaluation_paragraphs,
    haystack_ids,
    split_topics,
)

SMALL = CalibConfig(
    n_text=1, text_length=200, n_passkey=2, n_multikey=2, probe_length=600,
    repeat_block=32, repeat_times=3,
)  # fmt: skip


class CharTokenizer:
    """One token per character: fast, and decode(ids) gives the exact text back."""

    bos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(ch) for ch in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)

    def __len__(self) -> int:
        return 50000


class BosCharTokenizer(CharTokenizer):
    """Like CharTokenizer but prepends BOS (id 1) by default, as Llama-3 tokenizers do."""

    bos_token_id = 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + super().encode(text)


def _decode(tokenizer, prompt: CalibPrompt, start: int, end: int) -> str:
    return tokenizer.decode(list(prompt.input_ids[start:end]))


def _check_probes(tokenizer, prompts: list[CalibPrompt], length: int) -> None:
    """Needle spans hold the answer; answer positions predict exactly the answer tokens."""
    probes = [p for p in prompts if p.kind in ("passkey", "multikey")]
    assert probes
    for prompt in probes:
        assert len(prompt.input_ids) == length
        answer = "".join(tokenizer.decode([prompt.input_ids[p + 1]]) for p in prompt.answer_positions)
        assert answer.isdigit() and len(answer) == 5
        assert prompt.answer_positions[-1] == length - 2  # the last token is the last answer digit
        assert list(prompt.answer_positions) == list(range(length - 1 - len(answer), length - 1))
        expected_spans = 2 if prompt.kind == "passkey" else 1
        assert len(prompt.needle_spans) == expected_spans
        for start, end in prompt.needle_spans:
            assert 0 < start < end < prompt.answer_positions[0]
            assert _decode(tokenizer, prompt, start, end) == answer
        question = _decode(tokenizer, prompt, prompt.needle_spans[-1][1], prompt.answer_positions[0] + 1).rstrip()
        if prompt.kind == "passkey":
            assert question.endswith("What is the pass key? The pass key is")
        else:
            needle = _decode(tokenizer, prompt, prompt.needle_spans[0][0] - 40, prompt.needle_spans[0][0])
            key = needle.split("The secret code for ")[-1].removesuffix(" is ").strip()
            assert question.endswith(f"What is the secret code for {key}? The secret code for {key} is")


# ----------------------------------------------------------------- text source


def test_calibration_and_evaluation_text_are_disjoint():
    calib_topics, eval_topics = split_topics()
    assert calib_topics and eval_topics and not set(calib_topics) & set(eval_topics)
    calib, evaluation = calibration_paragraphs(), evaluation_paragraphs()
    assert len(calib) > 50 and len(evaluation) > 50
    assert not set(calib) & set(evaluation)
    calib_text = "\n".join(calib)
    assert not any(p in calib_text for p in evaluation)


def test_paragraphs_are_clean_prose():
    for paragraph in calibration_paragraphs() + evaluation_paragraphs():
        assert paragraph == " ".join(paragraph.split())
        assert len(paragraph) >= 80 and ">>>" not in paragraph


def test_haystack_exact_deterministic_and_seeded():
    tok = CharTokenizer()
    paragraphs = calibration_paragraphs()
    first = haystack_ids(tok, paragraphs, 777, seed=3)
    assert len(first) == 777
    assert first == haystack_ids(tok, paragraphs, 777, seed=3)
    assert first != haystack_ids(tok, paragraphs, 777, seed=4)
    assert tok.decode(first) in "\n".join(paragraphs * 2)
    assert haystack_ids(tok, paragraphs, 0, seed=3) == []


def test_haystack_cycles_short_paragraph_lists():
    tok = CharTokenizer()
    ids = haystack_ids(tok, ["Alpha beta gamma.", "Delta epsilon."], 500, seed=0)
    assert len(ids) == 500
    assert "Delta epsilon.\nAlpha beta gamma." in tok.decode(ids)


# ----------------------------------------------------------------- built-in set


def test_builtin_set_shapes_with_char_tokenizer():
    tok = CharTokenizer()
    prompts = build_calibration_set(tok, SMALL)
    names = [p.name for p in prompts]
    assert names == ["text-0", "passkey-0", "passkey-1", "multikey-0", "multikey-1", "repeat-0"]
    assert len(prompts[0].input_ids) == 200
    _check_probes(tok, prompts, 600)


def test_repeat_block_is_periodic():
    tok = CharTokenizer()
    (repeat,) = [p for p in build_calibration_set(tok, SMALL) if p.kind == "repeat"]
    k, start = repeat.repeat_period, repeat.repeat_start
    assert (k, start) == (32, 0) and len(repeat.input_ids) == 32 * 3
    ids = repeat.input_ids
    assert all(ids[i] == ids[i + k] for i in range(start, len(ids) - k))
    block = ids[start : start + k]
    assert len(set(block)) == k  # no token repeats inside the block: unambiguous targets
    assert all(1000 <= t < 50000 - 1000 for t in block)


def test_bos_is_prepended_when_the_tokenizer_adds_one():
    tok = BosCharTokenizer()
    prompts = build_calibration_set(tok, SMALL)
    assert all(p.input_ids[0] == 1 for p in prompts)
    assert all(1 not in p.input_ids[1:] for p in prompts if p.kind != "repeat")
    (repeat,) = [p for p in prompts if p.kind == "repeat"]
    assert repeat.repeat_start == 1 and len(repeat.input_ids) == 1 + 32 * 3
    _check_probes(tok, prompts, 600)


def test_builtin_set_is_deterministic_and_seeded():
    tok = CharTokenizer()
    first = build_calibration_set(tok, SMALL)
    assert first == build_calibration_set(tok, SMALL)
    other = build_calibration_set(tok, dataclasses.replace(SMALL, seed=1))
    assert all(a.input_ids != b.input_ids for a, b in zip(first, other, strict=True))


def test_too_short_probe_length_is_a_calibration_error():
    with pytest.raises(CalibrationError, match="probe_length"):
        build_calibration_set(CharTokenizer(), dataclasses.replace(SMALL, probe_length=50))


@pytest.mark.slow
def test_builtin_set_on_the_real_tokenizer(tokenizer):
    config = CalibConfig()
    prompts = build_calibration_set(tokenizer, config)
    kinds = [p.kind for p in prompts]
    assert kinds == ["text"] * 2 + ["passkey"] * 2 + ["multikey"] * 2 + ["repeat"]
    assert all(len(p.input_ids) == config.probe_length == config.text_length for p in prompts)
    assert all(p.input_ids[0] != tokenizer.bos_token_id for p in prompts)  # SmolLM2 adds no BOS
    _check_probes(tokenizer, prompts, config.probe_length)
    for prompt in prompts:  # one token per passkey digit on SmolLM2
        for start, end in prompt.needle_spans:
            assert end - start == 5
    (repeat,) = [p for p in prompts if p.kind == "repeat"]
    ids, k = repeat.input_ids, repeat.repeat_period
    assert all(ids[i] == ids[i + k] for i in range(len(ids) - k))
    assert not set(ids) & set(tokenizer.all_special_ids)
    assert prompts == build_calibration_set(tokenizer, config)
    other = build_calibration_set(tokenizer, dataclasses.replace(config, seed=7))
    assert all(a.input_ids != b.input_ids for a, b in zip(prompts, other, strict=True))


# ----------------------------------------------------------------- user prompts

LONG = "This prompt is certainly long enough to be kept by the calibration reader."


def test_read_txt_blocks(tmp_path: Path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\nstill first\n\n  \n\nsecond prompt\r\n\r\nthird\n", encoding="utf-8")
    assert read_user_prompts(path) == ["first prompt\nstill first", "second prompt", "third"]


def test_read_jsonl_records(tmp_path: Path):
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"text": "one", "id": 1}), "", json.dumps({"text": "two\nlines"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert read_user_prompts(path) == ["one", "two\nlines"]


def _write(tmp_path: Path, name: str, content: bytes | str) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("missing.txt", None, "does not exist"),
        ("latin1.txt", "caf\xe9 au lait".encode("latin-1"), "not UTF-8"),
        ("empty.txt", "\n \n\n", "no prompts"),
        ("empty.jsonl", "\n\n", "no prompts"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', "bad JSON at line 2"),
        ("nofield.jsonl", '{"text": "ok"}\n\n{"prompt": "x"}\n', 'missing "text" field at line 3'),
        ("list.jsonl", '["text"]\n', 'missing "text" field at line 1'),
        ("number.jsonl", '{"text": 3}\n', "line 1 is not a string"),
        ("prompts.csv", "text\nhello\n", "unsupported calibration file type '.csv'"),
        ("noext", "hello\n", "unsupported calibration file type"),
    ],
)
def test_user_file_errors(tmp_path: Path, name: str, content, pattern: str):
    path = tmp_path / name if content is None else _write(tmp_path, name, content)
    with pytest.raises(CalibrationError, match=pattern) as info:
        read_user_prompts(path)
    assert "\n" not in str(info.value) and ": " in str(info.value)


def test_directory_is_not_a_prompt_file(tmp_path: Path):
    folder = tmp_path / "prompts.txt"
    folder.mkdir()
    with pytest.raises(CalibrationError, match="not a file"):
        read_user_prompts(folder)


def test_user_prompts_are_truncated_and_short_ones_skipped(tmp_path: Path):
    tok = CharTokenizer()
    path = _write(tmp_path, "p.txt", f"tiny\n\n{LONG * 20}\n\n{LONG}\n")
    config = dataclasses.replace(SMALL, user_max_length=100)
    users = [p for p in build_calibration_set(tok, config, [path]) if p.kind == "user"]
    assert [p.name for p in users] == ["user-0", "user-1"]
    assert len(users[0].input_ids) == 100 and tok.decode(users[0].input_ids) == (LONG * 20)[:100]
    assert tok.decode(users[1].input_ids) == LONG


def test_user_prompts_all_too_short_is_an_error(tmp_path: Path):
    path = _write(tmp_path, "short.jsonl", '{"text": "hi"}\n{"text": "hello"}\n')
    assert len("hello") < MIN_USER_TOKENS
    with pytest.raises(CalibrationError, match="shorter than 16 tokens") as info:
        build_calibration_set(CharTokenizer(), SMALL, [path])
    assert "\n" not in str(info.value)
