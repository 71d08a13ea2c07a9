"""``kvcompile serve``: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

:func:`create_app` makes the FastAPI app around a started :class:`Scheduler`; :func:`serve`
runs it with uvicorn. Requests become :class:`~kvcompile.runtime.scheduler.Request` s; the
scheduler's events arrive on its worker thread and are handed to the request's asyncio task
with ``loop.call_soon_threadsafe`` into an ``asyncio.Queue``. A client that goes away (a
closed stream, or a dropped connection while a non-streaming answer is computed) cancels its
ticket, so its slot frees at the worker's next turn. Errors have OpenAI's body,
``{"error": {"message", "type", "param", "code"}}``. The server never writes to the artifact.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvcompile.errors import ContextLengthError
from kvcompile.runtime.generation import encode_chat, encode_prompt
from kvcompile.runtime.openai_schema import (
    COMPLETION_MAX_TOKENS,
    ChatRequest,
    CompletionRequest,
)
from kvcompile.runtime.scheduler import (
    Event,
    QueueFullError,
    Request,
    Sampling,
    Scheduler,
    ShuttingDownError,
    Ticket,
)
from kvcompile.runtime.server_metrics import CONTENT_TYPE, ServerMetrics

__all__ = ["ApiError", "create_app", "serve"]

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is there
_TYPES = {400: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable"}


class ApiError(Exception):
    """An error answer: status, a message saying what to fix, OpenAI's param and code."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def _error_body(status: int, message: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def create_app(scheduler: Scheduler, engine: Any, model_name: str, *,
               drain_s: float = 30.0) -> FastAPI:
    """The app serving ``model_name`` from ``scheduler`` (started by the caller; stopped, with
    ``drain_s`` seconds to finish its requests, when the app's lifespan ends)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        deadline = app.state.drain_deadline or time.monotonic() + drain_s
        await asyncio.to_thread(scheduler.stop, max(0.0, deadline - time.monotonic()))

    app = FastAPI(title="kvcompile serve", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.metrics = metrics = ServerMetrics(scheduler)
    app.state.draining = False
    app.state.drain_deadline = None
    tokenizer = engine.tokenizer
    vocab_size = int(getattr(engine, "vocab_size", 0) or engine.arch.vocab_size)
    created = int(time.time())

    def refuse(status: int, message: str, param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.refused.labels(str(status)).inc()
        return JSONResponse(_error_body(status, message, param, code), status_code=status,
                            headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(_: HttpRequest, exc: ApiError) -> JSONResponse:
        return refuse(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        return _validation_answer(exc, refuse)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
        return refuse(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _crash(_: HttpRequest, exc: Exception) -> JSONResponse:
        return refuse(500, f"internal error: {type(exc).__name__}: {exc}".splitlines()[0])

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(404, f"the model {name!r} is not served here; this server serves "
                                f"{model_name!r} (GET /v1/models)", "model", "model_not_found")

    def submit(prompt_ids: list[int], max_tokens: int, body: Any,
               on_event: Callable[[Event], None]) -> Ticket:
        if app.state.draining:
            raise ApiError(503, "the server is shutting down; retry on another replica")
        request = Request(prompt_ids, max_tokens,
                          Sampling(body.temperature, body.top_p, body.seed),
                          body.stop_strings(), on_event)
        try:
            return scheduler.submit(request)
        except ContextLengthError as exc:
            raise ApiError(400, str(exc), "max_tokens", "context_length_exceeded") from None
        except QueueFullError as exc:
            raise ApiError(429, str(exc), None, "queue_full",
                           {"Retry-After": str(exc.retry_after)}) from None
        except ShuttingDownError as exc:
            raise ApiError(503, str(exc)) from None
        except ValueError as exc:
            raise ApiError(400, str(exc), "max_tokens") from None

    async def answer(http: HttpRequest, body: Any, prompt_ids: list[int], max_tokens: int,
                     chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(event: Event) -> None:  # the scheduler's worker thread
            if event.finish_reason is not None:
                metrics.finished.labels(event.finish_reason).inc()
            loop.call_soon_threadsafe(events.put_nowait, event)

        ticket = submit(prompt_ids, max_tokens, body, on_event)
        reply = _Reply(chat, model_name, len(prompt_ids))
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(reply, ticket, events, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _collect(http, reply, ticket, events)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest, body: CompletionRequest) -> Response:
        check_model(body.model)
        ids = _completion_prompt(tokenizer, body.prompt, vocab_size)
        return await answer(http, body, ids, body.max_tokens or COMPLETION_MAX_TOKENS, False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest, body: ChatRequest) -> Response:
        check_model(body.model)
        ids = _chat_prompt(tokenizer, body)
        limit = body.token_limit()
        if limit is None:  # default: the context the prompt leaves
            limit = scheduler.pool.max_context - len(ids)
            if limit < 1:
                raise ApiError(400, f"the prompt ({len(ids)} tokens) leaves no room for an "
                                    f"answer in the context of {scheduler.pool.max_context} "
                                    f"tokens; shorten the messages", "messages",
                               "context_length_exceeded")
        return await answer(http, body, ids, limit, True)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(model_name, created)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        check_model(name)
        return _model_card(model_name, created)

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = scheduler.stats()
        status = "draining" if app.state.draining else "ok"
        return JSONResponse({"status": status, "model": model_name, "slots": stats.slots,
                             "active": stats.active, "queued": stats.queued},
                            status_code=503 if app.state.draining else 200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "kvcompile"}


def _validation_answer(exc: RequestValidationError,
                       refuse: Callable[..., JSONResponse]) -> JSONResponse:
    """Malformed JSON: 400; well-formed JSON with bad fields: 422, naming each field."""
    errors = list(exc.errors())
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "")
            return refuse(400, f"the body is not valid JSON ({detail}); send one JSON object")
    for error in errors:
        if tuple(error.get("loc", ())) == ("body",) and error.get("type") != "value_error":
            # no body, or JSON that is no object
            return refuse(400, "the body must be one JSON object (Content-Type: "
                               "application/json)")
    parts, first = [], None
    for error in errors[:5]:
        where = ".".join(str(p) for p in error.get("loc", ())[1:]) or "body"
        first = first or where
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return refuse(422, "invalid request: " + "; ".join(parts), first)


def _completion_prompt(tokenizer: Any, prompt: Any, vocab_size: int) -> list[int]:
    """The one prompt of a completions request as token ids."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, f"one prompt per request, got {len(prompt)}; send one request "
                                f"per prompt", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return encode_prompt(tokenizer, prompt)
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})",
                       "prompt")
    return list(prompt)


def _chat_prompt(tokenizer: Any, body: ChatRequest) -> list[int]:
    try:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    except ValueError as exc:
        raise ApiError(400, str(exc), "messages") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions",
                       "messages")
    try:
        return encode_chat(tokenizer, messages)
    except Exception as exc:  # noqa: BLE001  (the template's own refusal, e.g. role order)
        raise ApiError(400, f"the chat template refused the messages: {exc}".splitlines()[0],
                       "messages") from None


class _Reply:
    """OpenAI's response and chunk shapes for one request."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int) -> None:
        self.chat = chat
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, finish: str, completion_tokens: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": self.usage(completion_tokens)}

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False) -> str:
        if self.chat:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            head = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            head = self._head("text_completion")
        return _sse({**head, "choices": [choice]})

    def usage_chunk(self, completion_tokens: int) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return _sse({**self._head(kind), "choices": [], "usage": self.usage(completion_tokens)})


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _unfinished(reason: str, error: str | None) -> ApiError:
    """The error a request that did not finish normally gets."""
    if reason == "cancelled":
        return ApiError(503, "the request was cancelled: the server is shutting down")
    return ApiError(500, f"generation failed: {error or 'unknown error'}")


async def _collect(http: HttpRequest, reply: _Reply, ticket: Ticket,
                   events: asyncio.Queue[Event]) -> JSONResponse:
    """A non-streaming answer; the ticket is cancelled if the client leaves first."""
    finished = False
    checked = time.monotonic()
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() - checked >= DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await http.is_disconnected():
                    return JSONResponse({}, status_code=499)  # nobody reads it
            if event is None or event.finish_reason is None:
                continue
            finished = True
            done = ticket.completion
            assert done is not None  # set before the finish event is sent
            if event.finish_reason not in ("stop", "length"):
                raise _unfinished(event.finish_reason, event.error)
            return JSONResponse(reply.whole(done.text, done.finish_reason, len(done.token_ids)))
    finally:
        if not finished:
            ticket.cancel()


async def _stream(reply: _Reply, ticket: Ticket, events: asyncio.Queue[Event],
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: text chunks, the finish chunk, usage if asked, ``[DONE]``. The
    ticket is cancelled when the client goes away (the task is cancelled mid-stream)."""
    finished = False
    generated = 0
    try:
        if reply.chat:
            yield reply.chunk("", role=True)
        while True:
            event = await events.get()
            generated += len(event.token_ids)
            if event.text:
                yield reply.chunk(event.text)
            if event.finish_reason is None:
                continue
            finished = True
            if event.finish_reason in ("stop", "length"):
                yield reply.chunk(None, event.finish_reason)
            else:
                error = _unfinished(event.finish_reason, event.error)
                yield _sse(_error_body(error.status, error.message, None, None))
            if include_usage:
                yield reply.usage_chunk(generated)
            yield "data: [DONE]\n\n"
            return
    finally:
        if not finished:
            ticket.cancel()


def serve(app: FastAPI, host: str, port: int, drain_s: float,
          on_start: Callable[[str], None]) -> None:
    """Run ``app`` until SIGTERM or Ctrl-C, then drain: stop accepting, let in-flight
    requests finish for up to ``drain_s`` seconds, stop the scheduler. ``on_start`` gets the
    URL actually bound (the real port when ``port`` is 0)."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=max(1, int(round(drain_s))),
                            lifespan="on")
    _DrainingServer(config, app, drain_s, on_start).run()


class _DrainingServer(uvicorn.Server):
    """uvicorn's server that reports the bound URL, answers 503 once a signal came, and
    exits 0 after draining (uvicorn raises the signal again at the end; this does not)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float,
                 on_start: Callable[[str], None]) -> None:
        super().__init__(config)
        self.app = app
        self.drain_s = drain_s
        self.on_start = on_start

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            bound = self.servers[0].sockets[0].getsockname()
            host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            self.on_start(f"http://{host}:{bound[1]}")

    def handle_exit(self, sig: int, frame: Any) -> None:
        state = self.app.state
        if not state.draining:
            state.draining = True
            state.drain_deadline = time.monotonic() + self.drain_s
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
