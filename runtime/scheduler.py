"""Continuous batching: many requests share a :class:`~kvcompile.runtime.slots.SlotPool`.

One worker thread runs the loop. Each turn it admits the oldest queued request into prefill
when a slot is free (one prompt at a time), runs one prefill chunk, then one decode step for
every active row together; a request leaves its slot at end-of-sequence, ``max_tokens``, a
stop string or cancellation (a client that went away), and the next queued request takes it.
A long prompt therefore delays the others' next token by one chunk, not by its whole length.

Batching never changes a request's greedy tokens: rows are independent (per-row positions,
lengths and counters), and prompts are prefilled exactly as ``Engine.generate`` does.
Callers talk to the scheduler from any thread: :meth:`Scheduler.submit` returns a
:class:`Ticket`; events (new tokens and text, then the finish) go to the request's
``on_event`` from the worker thread. Torch-free: logits come from the pool as numpy arrays.
"""
from __future__ import annotations

import collections
import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvcompile.errors import ContextLengthError, KVCompileError
from kvcompile.runtime.sampling import sample
from kvcompile.runtime.slots import PrefillJob, SlotPool

__all__ = ["Completion", "Event", "QueueFullError", "Request", "Sampling", "Scheduler",
           "SchedulerStats", "ShuttingDownError", "Ticket"]

FINISH_REASONS = ("stop", "length", "cancelled", "error")
RATE_WINDOW_S = 10.0  # tokens/s is measured over this much recent time


class QueueFullError(KVCompileError):
    """The queue holds ``max_queue`` requests already; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDownError(KVCompileError):
    """The scheduler is draining or stopped and takes no new request."""


@dataclass(frozen=True)
class Sampling:
    """Greedy at temperature 0; else temperature + nucleus (``top_p``), seeded per request
    (``seed`` None: a fresh random seed)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Event:
    """New tokens of a request (and the text they complete), or its finish."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None  # one of FINISH_REASONS on the last event
    error: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    on_event: Callable[[Event], None] | None = None


@dataclass
class Completion:
    """What a finished request produced, with its timings (seconds from submission)."""

    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str
    error: str | None
    first_token_s: float | None
    total_s: float


class Ticket:
    """A submitted request: wait for it, or cancel it (from any thread)."""

    def __init__(self, request_id: int, request: Request) -> None:
        self.id = request_id
        self.request = request
        self.completion: Completion | None = None
        self._done = threading.Event()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop the request at the worker's next turn; its slot is freed."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> Completion | None:
        self._done.wait(timeout)
        return self.completion


@dataclass(frozen=True)
class SchedulerStats:
    slots: int
    active: int
    prefilling: int
    queued: int
    kv_bytes: int
    bytes_per_slot: int
    max_context: int
    prompt_tokens: int  # totals since start
    generated_tokens: int
    completed: int
    tokens_per_s: float  # generated, over the last RATE_WINDOW_S

    @property
    def free(self) -> int:
        return self.slots - self.active - self.prefilling


@dataclass
class _Running:
    """A request's state from admission on."""

    ticket: Ticket
    submitted: float
    rng: np.random.Generator
    job: PrefillJob | None = None
    tokens: list[int] = field(default_factory=list)
    sent_tokens: int = 0
    sent_text: int = 0
    text: str = ""
    first_token_s: float | None = None
    finish: str | None = None


class Scheduler:
    """Continuous batching of :class:`Request` s over ``pool`` (see the module docstring)."""

    def __init__(self, pool: SlotPool, tokenizer: Any, eos_token_ids: Sequence[int],
                 max_queue: int = 64) -> None:
        self.pool = pool
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_queue = max_queue
        self._lock = threading.Condition()
        self._queue: collections.deque[_Running] = collections.deque()
        self._prefill: _Running | None = None
        self._rows: list[_Running] = []  # row i of the pool holds _rows[i]
        self._ids = itertools.count(1)
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._prompt_tokens = 0
        self._generated = 0
        self._completed = 0
        self._recent: collections.deque[float] = collections.deque()  # when tokens came
        self._durations: collections.deque[float] = collections.deque(maxlen=32)

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kvcompile-scheduler",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, drain_s: float = 30.0) -> None:
        """Take no new request; let the running and queued ones finish for up to ``drain_s``
        seconds, cancel what is left, and end the worker."""
        with self._lock:
            self._accepting = False
            self._lock.notify_all()
        deadline = time.monotonic() + max(0.0, drain_s)
        while time.monotonic() < deadline and self._busy():
            time.sleep(0.02)
        with self._lock:
            for running in self._everyone():
                running.ticket.cancel()
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _busy(self) -> bool:
        with self._lock:  # reentrant: the worker asks while holding it
            return bool(self._queue or self._prefill or self._rows)

    def _everyone(self) -> list[_Running]:
        return [*self._queue, *([self._prefill] if self._prefill else []), *self._rows]

    # -- requests ---------------------------------------------------------------------------
    def submit(self, request: Request) -> Ticket:
        """Queue ``request``; refuses one that cannot fit a slot, or a full queue."""
        n_prompt = len(request.prompt_ids)
        if n_prompt == 0:
            raise ContextLengthError("the prompt is empty")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if n_prompt + request.max_tokens > self.pool.max_context:
            raise ContextLengthError(
                f"the prompt ({n_prompt} tokens) plus max_tokens ({request.max_tokens}) exceed "
                f"the context of {self.pool.max_context} tokens; shorten the prompt or lower "
                f"max_tokens")
        with self._lock:
            if not self._accepting:
                raise ShuttingDownError("the server is shutting down; retry on another replica")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests wait for "
                                     f"{self.pool.slots} slots); retry later",
                                     self._retry_after())
            ticket = Ticket(next(self._ids), request)
            seed = request.sampling.seed
            self._queue.append(_Running(ticket, time.monotonic(), np.random.default_rng(seed)))
            self._lock.notify_all()
        return ticket

    def _retry_after(self) -> int:
        """Seconds until a queued request likely starts: the mean recent request time times
        the queue's rounds through the slots, at least 1."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        rounds = (len(self._queue) + self.pool.slots) / self.pool.slots
        return max(1, math.ceil(mean * rounds))

    def stats(self) -> SchedulerStats:
        with self._lock:
            now = time.monotonic()
            self._trim_rate(now)
            return SchedulerStats(
                slots=self.pool.slots, active=len(self._rows),
                prefilling=int(self._prefill is not None), queued=len(self._queue),
                kv_bytes=self.pool.kv_bytes, bytes_per_slot=self.pool.bytes_per_slot,
                max_context=self.pool.max_context, prompt_tokens=self._prompt_tokens,
                generated_tokens=self._generated, completed=self._completed,
                tokens_per_s=len(self._recent) / RATE_WINDOW_S)

    def _trim_rate(self, now: float) -> None:
        while self._recent and self._recent[0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    # -- the worker ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not (self._queue or self._prefill or self._rows):
                    self._lock.wait()
                if self._stop and not self._busy():
                    return
                self._admit()
            try:
                self._turn()
            except Exception as exc:  # a failing step must not take the server down
                self._fail_everyone_running(exc)
            if self._stop:
                with self._lock:
                    for running in self._everyone():
                        running.ticket.cancel()

    def _admit(self) -> None:
        """Under the lock: drop cancelled queued requests, start the next prefill."""
        for running in [r for r in self._queue if r.ticket.cancelled]:
            self._queue.remove(running)
            self._complete(running, "cancelled")
        if self._prefill is None and self._queue and len(self._rows) < self.pool.slots:
            running = self._queue.popleft()
            try:
                running.job = self.pool.begin(running.ticket.request.prompt_ids)
            except Exception as exc:  # noqa: BLE001 - this request fails, the loop goes on
                self._complete(running, "error", _one_line(exc))
                return
            self._prefill = running

    def _turn(self) -> None:
        """One prefill chunk (if a prompt is on its way in), then one decode step."""
        running = self._prefill
        if running is not None:
            if running.ticket.cancelled:
                self._prefill = None
                self._complete(running, "cancelled")
            elif not running.job.step():  # only the last chunk left: into the next row
                logits = self.pool.finish(running.job)
                self._prompt_tokens += running.job.prompt_tokens
                running.job = None
                with self._lock:
                    self._rows.append(running)
                    self._prefill = None
                self._accept_token(running, logits)
        self._release_finished()
        if self._rows:
            logits = self.pool.decode([running.tokens[-1] for running in self._rows])
            for running, row_logits in zip(self._rows, logits, strict=True):
                self._accept_token(running, row_logits)
            self._release_finished()

    def _accept_token(self, running: _Running, logits: np.ndarray) -> None:
        """Pick the next token of ``running`` and tell its caller; mark a finish."""
        request = running.ticket.request
        if running.ticket.cancelled:
            running.finish = "cancelled"
            return
        sampling = request.sampling
        token = sample(logits, sampling.temperature, sampling.top_p, running.rng)
        now = time.monotonic()
        if running.first_token_s is None:
            running.first_token_s = now - running.submitted
        if token in self.eos_token_ids:
            running.finish = "stop"
            return
        running.tokens.append(token)
        with self._lock:
            self._generated += 1
            self._recent.append(now)
        text = self.tokenizer.decode(running.tokens, skip_special_tokens=True)
        cut = _first_stop(text, request.stop)
        if cut is not None:
            running.text = text[:cut]
            running.finish = "stop"
            return
        running.text = text
        if len(running.tokens) >= request.max_tokens:
            running.finish = "length"
            return
        self._send(running)

    def _send(self, running: _Running) -> None:
        """Tell the caller the tokens and whole characters it has not seen yet; text that
        could still grow into a stop string is held back until it cannot."""
        text = running.text
        safe = _safe_length(text, running.ticket.request.stop)
        while safe > running.sent_text and text[safe - 1] == "\ufffd":  # a partial character
            safe -= 1
        new_text = text[running.sent_text:safe] if safe > running.sent_text else ""
        new_tokens = tuple(running.tokens[running.sent_tokens:])
        if not (new_text or new_tokens):
            return
        running.sent_text += len(new_text)
        running.sent_tokens = len(running.tokens)
        _notify(running, Event(new_tokens, new_text))

    def _release_finished(self) -> None:
        """Free the rows whose requests finished (highest row first: the pool moves its last
        active row into a freed one, which is then never one still to be freed)."""
        for row in range(len(self._rows) - 1, -1, -1):
            running = self._rows[row]
            if running.finish is None and running.ticket.cancelled:
                running.finish = "cancelled"
            if running.finish is None:
                continue
            moved = self.pool.release(row)
            with self._lock:
                last = self._rows.pop()
                if moved is not None:
                    self._rows[row] = last
            self._complete(running, running.finish)

    def _complete(self, running: _Running, reason: str, error: str | None = None) -> None:
        """Send what is left and the finish, record the completion, wake the waiter."""
        request = running.ticket.request
        text = running.text
        remaining = text[running.sent_text:]
        new_tokens = tuple(running.tokens[running.sent_tokens:])
        elapsed = time.monotonic() - running.submitted
        running.ticket.completion = Completion(
            prompt_tokens=len(request.prompt_ids), token_ids=list(running.tokens), text=text,
            finish_reason=reason, error=error, first_token_s=running.first_token_s,
            total_s=elapsed)
        with self._lock:
            self._completed += 1
            if reason in ("stop", "length"):
                self._durations.append(elapsed)
        _notify(running, Event(new_tokens, remaining, reason, error))
        running.ticket._done.set()

    def _fail_everyone_running(self, exc: Exception) -> None:
        """A step failed: the requests it touched end with an error and their slots free."""
        message = _one_line(exc)
        failed = [*([self._prefill] if self._prefill else []), *self._rows]
        with self._lock:
            self._prefill = None
            self._rows = []
        while self.pool.active:
            self.pool.release(self.pool.active - 1)
        for running in failed:
            self._complete(running, "error", message)


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _notify(running: _Running, event: Event) -> None:
    """Hand ``event`` to the request's callback; one that raises cancels its own request
    (its caller is gone), never the loop."""
    callback = running.ticket.request.on_event
    if callback is None:
        return
    try:
        callback(event)
    except Exception:  # noqa: BLE001
        running.ticket.cancel()


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string begins in ``text``, or None."""
    found = [text.find(stop) for stop in stops if stop]
    found = [i for i in found if i >= 0]
    return min(found) if found else None


def _safe_length(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be sent: all but a tail that begins some stop string."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return len(text) - hold
