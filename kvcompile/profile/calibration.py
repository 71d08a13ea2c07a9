"""Calibration prompts for head profiling: real text, retrieval probes, a repeated block.

The profiler scores decode-like queries only (the last positions of every prompt and the
answer positions of probes). Probes follow the literature (``reference/algorithms.md``):
passkey and multi-key needles for the attention mass on the needle at answer positions
(Wu et al.; DuoAttention), and a repeated random-token block for echo and induction
scores (RazorAttention). All token spans are computed on ids: every piece of text is
tokenized on its own and the ids are concatenated, so boundaries are exact.
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcompile.errors import CalibrationError
from kvcompile.textsource import bos_prefix, calibration_paragraphs, encode_text, haystack_ids

KINDS = ("text", "passkey", "multikey", "repeat", "user")
MIN_USER_TOKENS = 16
USER_EXTENSIONS = (".txt", ".jsonl")
BOUNDARY_WINDOW = 48  # tokens to look back for a sentence end before inserting a needle

PASSKEY_INSTRUCTION = (
    "There is an important pass key hidden inside a lot of irrelevant text. "
    "Find it and memorize it.\n"
)
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
MULTIKEY_INSTRUCTION = (
    "There are several secret codes hidden inside a lot of irrelevant text. "
    "Find them and memorize them.\n"
)
MULTIKEY_QUESTION = "\nWhat is the secret code for {key}? The secret code for {key} is"
KEY_WORDS = (
    "apple", "river", "garden", "falcon", "marble", "lantern", "violin", "harbor",
    "copper", "meadow", "glacier", "pepper", "canyon", "saddle", "orchid", "timber",
    "velvet", "walnut", "beacon", "cobalt", "dolphin", "ember", "forest", "granite",
    "island", "jasmine", "kettle", "lemon", "mirror", "nutmeg", "olive", "parrot",
)  # fmt: skip

Piece = tuple[str, bool]  # (text, holds the needle value)


@dataclass(frozen=True)
class CalibPrompt:
    """One calibration prompt; positions and spans index ``input_ids``."""

    name: str
    kind: str
    input_ids: tuple[int, ...]
    answer_positions: tuple[int, ...] = ()
    needle_spans: tuple[tuple[int, int], ...] = ()
    repeat_period: int = 0
    repeat_start: int = 0
    context_length: int = 0  # probes: tokens before the question (the part that gets compressed)


@dataclass(frozen=True)
class CalibConfig:
    """Sizes of the built-in set; defaults total ~14k tokens (~2 min for 135M on 2 CPU cores).

    Prompts of 2048 tokens let the error curves see capacities up to 2048 and the probes
    find heads that retrieve over a long range, not just the last few hundred tokens.
    """

    n_text: int = 2
    text_length: int = 2048
    n_passkey: int = 2
    n_multikey: int = 2
    probe_length: int = 2048
    repeat_block: int = 512
    repeat_times: int = 4
    seed: int = 0
    user_max_length: int = 2048  # user prompts are truncated to this many tokens


# --------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class ProbeSpec:
    """The text of a needle probe, before tokenization."""

    instruction: str
    needles: tuple[tuple[Piece, ...], ...]
    depths: tuple[float, ...]  # one per needle, in [0, 1]
    targets: tuple[int, ...]  # needles whose value spans the question asks for
    question: str
    answer: str


@dataclass(frozen=True)
class Probe:
    """A tokenized probe: context (with needles), question and answer ids."""

    context_ids: tuple[int, ...]
    question_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # " <answer>" as tokenized; may start with a space token
    answer_offsets: tuple[int, ...]  # indices into answer_ids of the non-whitespace tokens
    needle_spans: tuple[tuple[int, int], ...]  # [start, end) of target values in context_ids
    answer: str


def passkey_spec(passkey: str, depth: float) -> ProbeSpec:
    """A passkey probe; both occurrences of the key in the needle are targets."""
    needle: tuple[Piece, ...] = (
        (" The pass key is", False),
        (f" {passkey}", True),
        (". Remember it.", False),
        (f" {passkey}", True),
        (" is the pass key.", False),
    )
    return ProbeSpec(PASSKEY_INSTRUCTION, (needle,), (depth,), (0,), PASSKEY_QUESTION, passkey)


def multikey_spec(
    rng: random.Random, asked_depth: float, n_keys: int = 4, value_range: tuple[int, int] = (10000, 100000)
) -> ProbeSpec:
    """``n_keys`` key-value needles at distinct depths; the asked one sits at ``asked_depth``."""
    keys = rng.sample(KEY_WORDS, n_keys)
    values = [str(v) for v in rng.sample(range(*value_range), n_keys)]
    slots = [round(0.05 + 0.1 * k, 2) for k in range(10)]
    free = [d for d in slots if abs(d - asked_depth) >= 0.1 - 1e-9]
    depths = (asked_depth, *sorted(rng.sample(free, n_keys - 1)))
    needles = tuple(
        ((f" The secret code for {key} is", False), (f" {value}", True), (".", False))
        for key, value in zip(keys, values, strict=True)
    )
    question = MULTIKEY_QUESTION.format(key=keys[0])
    return ProbeSpec(MULTIKEY_INSTRUCTION, needles, depths, (0,), question, values[0])


def _encode_needle(tokenizer: Any, needle: Sequence[Piece]) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of a needle and the [start, end) spans of its value pieces (leading spaces excluded)."""
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for text, is_value in needle:
        piece = encode_text(tokenizer, text)
        if is_value:
            skip = 0
            while skip < len(piece) - 1 and not tokenizer.decode([piece[skip]]).strip():
                skip += 1
            spans.append((len(ids) + skip, len(ids) + len(piece)))
        ids.extend(piece)
    return ids, spans


def _sentence_start(tokenizer: Any, filler: Sequence[int], pos: int) -> int:
    """Move an insertion point back to just after a sentence end, if one is near.

    A needle (" The pass key is ...") then continues the paragraph it lands in; ends
    followed by a newline inside the same token are skipped, the text would not join.
    """
    for j in range(pos, max(0, pos - BOUNDARY_WINDOW) - 1, -1):
        if j == 0:
            return 0
        text = tokenizer.decode([filler[j - 1]]).rstrip(" ")
        if text.endswith((".", "?", "!")):
            return j
    return pos


def build_probe(
    tokenizer: Any,
    paragraphs: Sequence[str],
    spec: ProbeSpec,
    length: int,
    seed: int | str,
    teacher_forced: bool = False,
) -> Probe:
    """Tokenize a probe so that the context is exactly ``length`` tokens.

    With ``teacher_forced`` the ``length`` covers context + question + answer instead
    (a calibration prompt). Raises ValueError when the fixed parts do not fit.
    """
    bos = bos_prefix(tokenizer)
    instruction = encode_text(tokenizer, spec.instruction)
    encoded = [_encode_needle(tokenizer, needle) for needle in spec.needles]
    question = encode_text(tokenizer, spec.question)
    answer = encode_text(tokenizer, f" {spec.answer}")
    offsets = tuple(i for i, t in enumerate(answer) if tokenizer.decode([t]).strip())
    context_length = length - (len(question) + len(answer) if teacher_forced else 0)
    fixed = len(bos) + len(instruction) + sum(len(ids) for ids, _ in encoded)
    n_filler = context_length - fixed
    if n_filler < 0:
        extra = length - context_length
        raise ValueError(f"length {length} is too short for this probe (needs at least {fixed + extra})")
    filler = haystack_ids(tokenizer, paragraphs, n_filler, seed)

    context = bos + instruction
    spans: list[tuple[int, int]] = []
    prev = 0
    for index in sorted(range(len(encoded)), key=lambda k: spec.depths[k]):
        target = round(min(max(spec.depths[index], 0.0), 1.0) * n_filler)
        pos = max(prev, _sentence_start(tokenizer, filler, target))
        context += filler[prev:pos]
        ids, value_spans = encoded[index]
        if index in spec.targets:
            spans.extend((len(context) + a, len(context) + b) for a, b in value_spans)
        context += ids
        prev = pos
    context += filler[prev:]
    return Probe(
        tuple(context), tuple(question), tuple(answer), offsets, tuple(sorted(spans)), spec.answer
    )


# ----------------------------------------------------------------- built-in set


def probe_prompt(name: str, kind: str, probe: Probe) -> CalibPrompt:
    ids = probe.context_ids + probe.question_ids + probe.answer_ids
    start = len(probe.context_ids) + len(probe.question_ids)
    positions = tuple(start + k - 1 for k in probe.answer_offsets)
    return CalibPrompt(name, kind, ids, answer_positions=positions, needle_spans=probe.needle_spans,
                       context_length=len(probe.context_ids))


def _text_prompts(tokenizer: Any, config: CalibConfig, paragraphs: list[str]) -> list[CalibPrompt]:
    bos = bos_prefix(tokenizer)
    return [
        CalibPrompt(
            f"text-{i}",
            "text",
            tuple(bos + haystack_ids(tokenizer, paragraphs, config.text_length - len(bos), f"{config.seed}:text:{i}")),
        )
        for i in range(config.n_text)
    ]


def _needle_prompts(
    tokenizer: Any, config: CalibConfig, paragraphs: list[str], kind: str
) -> list[CalibPrompt]:
    count = config.n_passkey if kind == "passkey" else config.n_multikey
    prompts = []
    for i in range(count):
        rng = random.Random(f"{config.seed}:{kind}:{i}")
        depth = round(rng.uniform(0.1, 0.9), 3)
        if kind == "passkey":
            spec = passkey_spec(str(rng.randrange(10000, 100000)), depth)
        else:
            spec = multikey_spec(rng, depth)
        try:
            probe = build_probe(
                tokenizer, paragraphs, spec, config.probe_length, f"{config.seed}:{kind}-filler:{i}", True
            )
        except ValueError as err:
            raise CalibrationError(f"{kind} probe: {err}: raise probe_length") from None
        prompts.append(probe_prompt(f"{kind}-{i}", kind, probe))
    return prompts


def _vocab_size(tokenizer: Any) -> int:
    try:
        return len(tokenizer)
    except TypeError:
        return int(tokenizer.vocab_size)


def _repeat_prompt(tokenizer: Any, config: CalibConfig) -> CalibPrompt:
    """A random block of ordinary token ids repeated; induction/echo targets are unambiguous
    because the block has no repeated token (sampled without replacement)."""
    vocab = _vocab_size(tokenizer)
    low, high = (1000, vocab - 1000) if vocab - 2000 >= config.repeat_block else (0, vocab)
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    pool = [t for t in range(low, high) if t not in special]
    rng = random.Random(f"{config.seed}:repeat:0")
    if len(pool) >= config.repeat_block:
        block = rng.sample(pool, config.repeat_block)
    else:
        block = [rng.choice(pool) for _ in range(config.repeat_block)]
    bos = bos_prefix(tokenizer)
    ids = tuple(bos + block * config.repeat_times)
    return CalibPrompt(
        "repeat-0", "repeat", ids, repeat_period=config.repeat_block, repeat_start=len(bos)
    )


def _check_config(config: CalibConfig) -> None:
    counts = (config.n_text, config.n_passkey, config.n_multikey)
    if min(counts) < 0:
        raise CalibrationError(f"prompt counts must be >= 0, got {counts}: fix the calibration config")
    if config.n_text and config.text_length < MIN_USER_TOKENS:
        raise CalibrationError(f"text_length {config.text_length} is too short: use at least {MIN_USER_TOKENS}")
    if config.repeat_block < 1 or config.repeat_times < 2:
        raise CalibrationError(
            f"the repeated block needs repeat_block >= 1 and repeat_times >= 2, got "
            f"{config.repeat_block} x {config.repeat_times}: fix the calibration config"
        )
    if config.user_max_length < MIN_USER_TOKENS:
        raise CalibrationError(f"user_max_length must be >= {MIN_USER_TOKENS}, got {config.user_max_length}")


def build_calibration_set(
    tokenizer: Any, config: CalibConfig = CalibConfig(), user_files: Sequence[Path] = ()
) -> list[CalibPrompt]:
    """The built-in prompts (text, passkey, multikey, repeat) plus the users' prompts.

    Deterministic for ``config.seed``; built from calibration paragraphs only.
    """
    _check_config(config)
    paragraphs = calibration_paragraphs()
    prompts = _text_prompts(tokenizer, config, paragraphs)
    prompts += _needle_prompts(tokenizer, config, paragraphs, "passkey")
    prompts += _needle_prompts(tokenizer, config, paragraphs, "multikey")
    prompts.append(_repeat_prompt(tokenizer, config))
    prompts += _user_prompts(tokenizer, config, user_files)
    return prompts


# ----------------------------------------------------------------- user prompts


def _user_prompts(tokenizer: Any, config: CalibConfig, files: Sequence[Path]) -> list[CalibPrompt]:
    """Tokenize, truncate to ``user_max_length``; skip prompts under MIN_USER_TOKENS."""
    bos = bos_prefix(tokenizer)
    prompts: list[CalibPrompt] = []
    for path in files:
        kept = 0
        for text in read_user_prompts(Path(path)):
            ids = encode_text(tokenizer, text)
            if len(ids) < MIN_USER_TOKENS:
                continue
            full = (bos + ids)[: config.user_max_length]
            prompts.append(CalibPrompt(f"user-{len(prompts)}", "user", tuple(full)))
            kept += 1
        if not kept:
            raise CalibrationError(
                f"every prompt in {path} is shorter than {MIN_USER_TOKENS} tokens: use longer prompts"
            )
    return prompts


def read_user_prompts(path: Path) -> list[str]:
    """Prompts from a ``.txt`` (blank-line-separated blocks) or ``.jsonl`` (``{"text": ...}``) file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in USER_EXTENSIONS:
        raise CalibrationError(
            f"unsupported calibration file type '{suffix or '(none)'}' for {path}: use .txt "
            '(prompts separated by blank lines) or .jsonl (one {"text": ...} object per line)'
        )
    text = _read_text(path)
    prompts = _parse_txt(text) if suffix == ".txt" else _parse_jsonl(text, path)
    if not prompts:
        raise CalibrationError(
            f"{path} contains no prompts: add text (blank-line-separated blocks in .txt, "
            '{"text": ...} lines in .jsonl)'
        )
    return prompts


def _read_text(path: Path) -> str:
    if not path.exists():
        raise CalibrationError(f"calibration file {path} does not exist: check the path")
    if not path.is_file():
        raise CalibrationError(f"calibration path {path} is not a file: pass a .txt or .jsonl file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CalibrationError(f"cannot read calibration file {path} ({err.strerror}): check its permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CalibrationError(
            f"calibration file {path} is not UTF-8 (bad byte at offset {err.start}): save it as UTF-8"
        ) from None


def _parse_txt(text: str) -> list[str]:
    blocks = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    return [block.strip() for block in blocks if block.strip()]


def _parse_jsonl(text: str, path: Path) -> list[str]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CalibrationError(
                f'{path}: bad JSON at line {number} ({err.msg}): write one {{"text": ...}} object per line'
            ) from None
        if not isinstance(record, dict) or "text" not in record:
            raise CalibrationError(
                f'{path}: missing "text" field at line {number}: each line needs {{"text": ...}}'
            )
        if not isinstance(record["text"], str):
            raise CalibrationError(f'{path}: "text" at line {number} is not a string: use a JSON string')
        if record["text"].strip():
            prompts.append(record["text"].strip())
    return prompts
