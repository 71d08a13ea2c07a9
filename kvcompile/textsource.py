"""Real text present on every machine: Python's own documentation (``pydoc_data.topics``).

The topics are split by name into two disjoint halves so that evaluation text is never
seen during calibration. The text depends on the Python version (topics differ slightly
between releases) but is fixed for a given interpreter, so everything built from it is
deterministic for a seed.

A second genre that calibration never sees, for evaluation only: legal prose, the licence
texts every Debian or Ubuntu system ships in ``/usr/share/common-licenses`` (``base-files``,
an essential package: GPL, LGPL, MPL, Apache, GFDL, Artistic, CC0).
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from kvcompile.errors import CalibrationError

MIN_PARAGRAPH_CHARS = 80
MIN_PROSE_FRACTION = 0.8  # letters + spaces / all characters; code and tables score lower
PARAGRAPH_SEPARATOR = "\n"

_BLANK_LINE = re.compile(r"\n\s*\n")
_UNDERLINE = re.compile(r"[*=\-~^\"#+]{3,}")


def _topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise CalibrationError(
            "this Python lacks its documentation topics (pydoc_data): install the full "
            "standard library (e.g. Debian's libpython3-stdlib)"
        ) from None
    return dict(topics)


def split_topics() -> tuple[list[str], list[str]]:
    """Topic names (sorted) alternately assigned to calibration (even) and evaluation (odd)."""
    names = sorted(_topics())
    return names[0::2], names[1::2]


def clean_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of one topic: whitespace collapsed, headings/code/short bits dropped."""
    out: list[str] = []
    for block in _BLANK_LINE.split(text):
        lines = [line for line in block.splitlines() if line.strip()]
        if lines and _UNDERLINE.fullmatch(lines[-1].strip()):
            lines = lines[:-1]  # heading underline
        paragraph = " ".join(" ".join(lines).split())
        if _is_prose(paragraph):
            out.append(paragraph)
    return out


def _is_prose(paragraph: str) -> bool:
    if len(paragraph) < MIN_PARAGRAPH_CHARS or paragraph[-1] not in ".:?!)":
        return False
    if ">>>" in paragraph or "::=" in paragraph:  # doctest sessions, grammar rules
        return False
    prose = sum(ch.isalpha() or ch == " " for ch in paragraph)
    return prose / len(paragraph) >= MIN_PROSE_FRACTION


@lru_cache(maxsize=1)
def _halves() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Both halves, deduplicated; a paragraph that occurs in both halves is dropped from both."""
    topics = _topics()
    calib_names, eval_names = split_topics()
    calib = _unique(p for name in calib_names for p in clean_paragraphs(topics[name]))
    evaluation = _unique(p for name in eval_names for p in clean_paragraphs(topics[name]))
    shared = set(calib) & set(evaluation)
    return (
        tuple(p for p in calib if p not in shared),
        tuple(p for p in evaluation if p not in shared),
    )


def _unique(paragraphs: Any) -> list[str]:
    return list(dict.fromkeys(paragraphs))


def calibration_paragraphs() -> list[str]:
    """Paragraphs used only for calibration prompts."""
    return list(_halves()[0])


def evaluation_paragraphs() -> list[str]:
    """Paragraphs used only for evaluation cases (never seen by calibration)."""
    return list(_halves()[1])


LICENSE_DIR = Path("/usr/share/common-licenses")
MIN_LICENSE_PARAGRAPHS = 100


@lru_cache(maxsize=1)
def _license_paragraphs() -> tuple[str, ...]:
    files = sorted({path.resolve() for path in LICENSE_DIR.glob("*") if path.is_file()}) \
        if LICENSE_DIR.is_dir() else []
    paragraphs = _unique(p for path in files for p in clean_paragraphs(path.read_text(errors="replace")))
    if len(paragraphs) < MIN_LICENSE_PARAGRAPHS:
        raise CalibrationError(
            f"the licences genre needs the texts in {LICENSE_DIR} (Debian's base-files package), "
            f"found {len(paragraphs)} paragraphs: run on Debian/Ubuntu or choose --genre pydoc"
        )
    return tuple(paragraphs)


def license_paragraphs() -> list[str]:
    """Legal prose (an unseen genre): paragraphs of the system's licence texts, deduplicated."""
    return list(_license_paragraphs())


GENRES: dict[str, Callable[[], list[str]]] = {
    "pydoc": evaluation_paragraphs,  # the calibration genre's held-out half
    "licenses": license_paragraphs,  # never seen by calibration
}


def genre_paragraphs(genre: str) -> list[str]:
    """Evaluation paragraphs of ``genre`` (one of ``GENRES``)."""
    if genre not in GENRES:
        raise CalibrationError(f"unknown text genre {genre!r}: choose one of {', '.join(GENRES)}")
    return GENRES[genre]()


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, so pieces concatenate exactly."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:  # simple tokenizers without the keyword
        ids = tokenizer.encode(text)
    return [int(i) for i in ids]


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos]`` if the tokenizer normally prepends a BOS token, else ``[]`` (SmolLM2: ``[]``)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    try:
        ids = list(tokenizer.encode("a"))
    except Exception:  # a tokenizer that cannot say adds nothing
        return []
    return [int(bos)] if ids and int(ids[0]) == int(bos) else []


def haystack_ids(
    tokenizer: Any, paragraphs: Sequence[str], n_tokens: int, seed: int | str
) -> list[int]:
    """Exactly ``n_tokens`` ids of real text, starting at a seed-dependent paragraph.

    Paragraphs are concatenated (cycling if needed), tokenized once and cut at a token
    boundary, so the result is the tokenizer's own segmentation of the text.
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if n_tokens == 0:
        return []
    if not paragraphs:
        raise ValueError("no paragraphs to build a haystack from")
    start = random.Random(seed).randrange(len(paragraphs))
    chars_per_token = 5.0
    pieces: list[str] = []
    n_chars = 0
    index = start
    for _ in range(64):
        target = (n_tokens + 8) * chars_per_token
        while n_chars < target:
            paragraph = paragraphs[index % len(paragraphs)]
            pieces.append(paragraph)
            n_chars += len(paragraph) + len(PARAGRAPH_SEPARATOR)
            index += 1
        ids = encode_text(tokenizer, PARAGRAPH_SEPARATOR.join(pieces))
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        chars_per_token *= 1.5
    raise ValueError("the tokenizer produced too few tokens for the haystack")
