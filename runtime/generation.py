"""What every serving backend shares: the generation result, prompt encoding, stop tokens and
the token loop.

Torch-free, so the onnxruntime backend uses the same definitions as the torch engine.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kvcompile.errors import ContextLengthError
from kvcompile.runtime.protocols import KVCache

L = TypeVar("L")  # a backend's logits: a torch tensor or a numpy array


@dataclass
class Generation:
    prompt_tokens: int
    token_ids: list[int]
    text: str
    stop_reason: str  # "eos" | "max_tokens"
    kv_bytes: int


def encode_prompt(tokenizer: Any, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of ``prompt`` (with the tokenizer's special tokens), or of the chat template
    wrapping it as one user message, ready for the assistant's answer."""
    if chat:
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of a whole conversation in the tokenizer's chat template, ready for the
    assistant's answer (what ``/v1/chat/completions`` feeds the model; one user message gives
    ``encode_prompt(..., chat=True)``)."""
    return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def eos_ids(tokenizer: Any) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def check_prompt(ids: Sequence[int], max_new_tokens: int, max_context: int) -> None:
    """Refuse, before anything is allocated, a prompt the cache cannot hold with its answer."""
    if not ids:
        raise ContextLengthError("the prompt is empty")
    if len(ids) + max_new_tokens > max_context:
        raise ContextLengthError(
            f"prompt ({len(ids)} tokens) + max new tokens ({max_new_tokens}) exceed the context "
            f"of {max_context}; shorten the prompt or lower --max-new-tokens")


def check_prefill(length: int, caches: Sequence[KVCache]) -> None:
    """A prefill of ``length`` tokens needs empty caches with room for it (any backend's)."""
    for cache in caches:
        if length > cache.max_context:
            raise ContextLengthError(
                f"the prompt has {length} tokens, more than the context of {cache.max_context}; "
                f"shorten it or allocate a larger context")
        if cache.length:
            raise ValueError("prefill needs empty caches; call reset() first")


def check_extend(cache: KVCache, n_new: int) -> None:
    """Refuse ``n_new`` more tokens that would overflow ``cache`` (any backend's)."""
    if cache.length + n_new > cache.max_context:
        raise ContextLengthError(
            f"{cache.length} cached + {n_new} new tokens exceed the context of "
            f"{cache.max_context}; generate fewer tokens or use a shorter prompt")


def decode_loop(logits: L, pick: Callable[[L], int], step: Callable[[int], L], tokenizer: Any,
                stop_ids: Sequence[int], max_new_tokens: int,
                on_text: Callable[[str], None] | None = None) -> tuple[list[int], str, str]:
    """The token loop every backend runs after its prefill: ``pick`` a token from the last
    logits, stop at end-of-sequence or ``max_new_tokens``, else ``step`` it through the model.
    Streams whole characters to ``on_text``. Returns (token ids, text, stop reason)."""
    generated: list[int] = []
    printed = ""
    reason = "max_tokens"
    for _ in range(max_new_tokens):
        token = pick(logits)
        if token in stop_ids:
            reason = "eos"
            break
        generated.append(token)
        if on_text is not None:
            text = tokenizer.decode(generated, skip_special_tokens=True)
            if len(text) > len(printed) and not text.endswith("\ufffd"):
                on_text(text[len(printed):])
                printed = text
        if len(generated) == max_new_tokens:
            break
        logits = step(token)
    text = tokenizer.decode(generated, skip_special_tokens=True)
    if on_text is not None and len(text) > len(printed):
        on_text(text[len(printed):])
    return generated, text, reason
