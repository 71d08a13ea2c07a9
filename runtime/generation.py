"""What every serving backend shares: the generation result, prompt encoding, stop tokens.

Torch-free, so the onnxruntime backend uses the same definitions as the torch engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def eos_ids(tokenizer: Any) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
