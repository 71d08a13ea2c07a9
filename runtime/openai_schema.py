"""The request bodies of ``kvcompile serve``'s OpenAI-compatible endpoints (pydantic models).

Only what the server honours is declared; other fields OpenAI clients send (``user``,
``presence_penalty``...) are ignored, and the few that would change the answer in a way the
server cannot (``n`` > 1, ``echo``, ``logprobs``, ``best_of``, ``suffix``, ``tools``) are
refused with a message rather than silently dropped.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["ChatMessage", "ChatRequest", "CompletionRequest", "StreamOptions",
           "COMPLETION_MAX_TOKENS"]

COMPLETION_MAX_TOKENS = 16
"""``/v1/completions``' default ``max_tokens``, as OpenAI's; chat defaults to the context left."""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Sampling and stopping fields both endpoints share. Defaults are OpenAI's (temperature
    1: sampling); send ``temperature: 0`` for greedy tokens, those of ``kvcompile run``."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is served; send one request per choice")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop strings")
        return value

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Common:
        extra = self.model_extra or {}
        for name, neutral in (("echo", (None, False)), ("logprobs", (None, False, 0)),
                              ("best_of", (None, 1)), ("suffix", (None, "")),
                              ("top_logprobs", (None, 0)), ("tools", (None, [])),
                              ("functions", (None, []))):
            if name in extra and extra[name] not in neutral:
                raise ValueError(f"{name} is not supported by this server; drop the field")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Common):
    """``/v1/completions``: one prompt, text or token ids (a one-element list of either is
    accepted; several prompts are refused by the server with a 400)."""

    prompt: str | list[int] | list[str] | list[list[int]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The content as one string (text parts of a list joined; other parts refused)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are served, got {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Common):
    """``/v1/chat/completions``: ``max_completion_tokens`` is the newer name of
    ``max_tokens``; without either the answer may fill the context the prompt leaves."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
