"""The OpenAI-compatible app in-process: a real Scheduler and TorchSlotPool on a tiny artifact,
driven through httpx's ASGI transport (or raw ASGI calls, to drop a client mid-answer).

The reference is ``Engine.generate`` on the same prompt (what ``kvcompile run`` prints): the
server's greedy text and token counts must be those, streamed or not, alone or in a batch.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvcompile.runtime import load
from kvcompile.runtime.generation import encode_chat, encode_prompt
from kvcompile.runtime.scheduler import Request, Scheduler
from kvcompile.runtime.server import create_app
from kvcompile.runtime.serving import open_pool
from tests.serving_tiny import CONTEXT, MODEL_NAME, build_serving_artifact

PROMPTS = ["The pass key is", "Hello there, world", "abc", "A longer prompt, with commas.",
           "zz top", "1234"]
WAIT_S = 10.0  # bound on every wait for the worker


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return build_serving_artifact(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def engine(artifact: Path) -> Any:
    return load(artifact)


def make_app(engine: Any, slots: int = 2, max_queue: int = 16, start: bool = True,
             pool: Any = None) -> tuple[Any, Scheduler]:
    pool = pool or open_pool(engine, "torch", slots=slots)
    scheduler = Scheduler(pool, engine.tokenizer, engine.eos_token_ids, max_queue=max_queue)
    if start:
        scheduler.start()
    return create_app(scheduler, engine, MODEL_NAME), scheduler


@pytest.fixture(scope="module")
def served(engine: Any):
    app, scheduler = make_app(engine)
    yield app, scheduler
    scheduler.stop(0)


async def _post_all(app: Any, requests: Sequence[tuple[str, str, Any]]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                 timeout=60) as client:
        calls = []
        for method, path, body in requests:
            if isinstance(body, (str, bytes)):
                calls.append(client.request(method, path, content=body,
                                            headers={"Content-Type": "application/json"}))
            else:
                calls.append(client.request(method, path, json=body))
        return list(await asyncio.gather(*calls))


def call(app: Any, method: str, path: str, body: Any = None) -> httpx.Response:
    return asyncio.run(_post_all(app, [(method, path, body)]))[0]


def events(response: httpx.Response) -> list[dict]:
    """The JSON chunks of a server-sent event stream, which must end with ``[DONE]``."""
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in response.text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks), response.text
    assert blocks[-1] == "data: [DONE]"
    return [json.loads(b.removeprefix("data: ")) for b in blocks[:-1]]


def body(prompt: str, max_tokens: int, chat: bool = False, stream: bool = False,
         **extra: Any) -> dict:
    out: dict[str, Any] = {"model": MODEL_NAME, "max_tokens": max_tokens, "temperature": 0,
                           "stream": stream, **extra}
    if chat:
        out["messages"] = [{"role": "user", "content": prompt}]
    else:
        out["prompt"] = prompt
    return out


def answer(response: httpx.Response, chat: bool, stream: bool) -> tuple[str, str, dict | None]:
    """(text, finish reason, usage) of a 200 response, streamed or not."""
    assert response.status_code == 200, response.text
    if not stream:
        data = response.json()
        choice = data["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        assert data["object"] == ("chat.completion" if chat else "text_completion")
        return text, choice["finish_reason"], data["usage"]
    chunks = events(response)
    kind = "chat.completion.chunk" if chat else "text_completion"
    assert {c["object"] for c in chunks} == {kind} and len({c["id"] for c in chunks}) == 1
    text = "".join((c["choices"][0]["delta"].get("content") or "") if chat
                   else c["choices"][0]["text"] for c in chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert all(f is None for f in finishes[:-1]) and finishes[-1] is not None
    if chat:
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    return text, finishes[-1], None


def expected_finish(generation: Any) -> str:
    return "stop" if generation.stop_reason == "eos" else "length"


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_answers_are_the_engines_greedy_text(served, engine, chat: bool, stream: bool) -> None:
    app, _ = served
    for prompt, max_tokens in (("The pass key is", 20), ("Hello there, world", 12)):
        reference = engine.generate(prompt, max_new_tokens=max_tokens, chat=chat)
        text, finish, usage = answer(call(app, "POST", "/v1/chat/completions" if chat
                                          else "/v1/completions",
                                          body(prompt, max_tokens, chat, stream)), chat, stream)
        assert text == reference.text
        assert finish == expected_finish(reference)
        if usage is not None:
            assert usage == {"prompt_tokens": reference.prompt_tokens,
                             "completion_tokens": len(reference.token_ids),
                             "total_tokens": reference.prompt_tokens + len(reference.token_ids)}


def test_token_id_prompts_and_stream_usage(served, engine) -> None:
    app, _ = served
    ids = encode_prompt(engine.tokenizer, "Hello there, world")
    reference = engine.generate(ids, max_new_tokens=9)
    for prompt in (ids, [ids]):
        text, _, usage = answer(call(app, "POST", "/v1/completions", body(prompt, 9)), False,
                                False)
        assert text == reference.text and usage["prompt_tokens"] == len(ids)
    streamed = events(call(app, "POST", "/v1/completions",
                           body("Hello there, world", 9, stream=True,
                                stream_options={"include_usage": True})))
    assert streamed[-1]["choices"] == []
    assert streamed[-1]["usage"]["completion_tokens"] == len(reference.token_ids)


def test_chat_encodes_every_message_with_the_template(served, engine) -> None:
    tokenizer = engine.tokenizer
    one = [{"role": "user", "content": "Hi there"}]
    assert encode_chat(tokenizer, one) == encode_prompt(tokenizer, "Hi there", chat=True)
    several = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Again"}]
    ids = encode_chat(tokenizer, several)
    text = "<system>Be brief.\n<user>Hi\n<assistant>Yo\n<user>Again\n<assistant>"
    assert ids == tokenizer(text, add_special_tokens=True)["input_ids"]
    reference = engine.generate(ids, max_new_tokens=10)
    response = call(served[0], "POST", "/v1/chat/completions",
                    {"model": MODEL_NAME, "messages": several, "max_completion_tokens": 10,
                     "temperature": 0})
    assert answer(response, True, False)[0] == reference.text
    # without a token limit the answer may fill the context the prompt leaves
    free = call(served[0], "POST", "/v1/chat/completions",
                {"model": MODEL_NAME, "messages": several, "temperature": 0})
    full = engine.generate(ids, max_new_tokens=CONTEXT - len(ids))
    assert answer(free, True, False)[:2] == (full.text, expected_finish(full))


def test_concurrent_requests_get_their_sequential_tokens(engine) -> None:
    app, scheduler = make_app(engine, slots=2)
    try:
        cases = [(p, 6 + 5 * i, i % 2 == 1, i % 3 == 0) for i, p in enumerate(PROMPTS)]
        requests = [("POST", "/v1/chat/completions" if chat else "/v1/completions",
                     body(p, n, chat, stream)) for p, n, chat, stream in cases]
        responses = asyncio.run(_post_all(app, requests))
        for (prompt, n, chat, stream), response in zip(cases, responses, strict=True):
            assert answer(response, chat, stream)[0] == \
                engine.generate(prompt, max_new_tokens=n, chat=chat).text, prompt
    finally:
        scheduler.stop(0)


def _context_case(engine: Any) -> tuple[dict, tuple[str, ...]]:
    n_prompt = len(encode_prompt(engine.tokenizer, "Hello there, world"))
    max_tokens = CONTEXT - n_prompt + 1
    return body("Hello there, world", max_tokens), (str(n_prompt), str(max_tokens), str(CONTEXT))


BAD = {
    "malformed JSON": ('{"model": "model", prompt}', 400, ("not valid JSON",)),
    "not an object": ('[1, 2]', 400, ("one JSON object",)),
    "no body": ("", 400, ("one JSON object",)),
    "missing prompt": ({"model": MODEL_NAME}, 422, ("prompt",)),
    "bad temperature": ({"model": MODEL_NAME, "prompt": "x", "temperature": -1}, 422,
                        ("temperature",)),
    "n above 1": ({"model": MODEL_NAME, "prompt": "x", "n": 2}, 422, ("n=1",)),
    "max_tokens 0": ({"model": MODEL_NAME, "prompt": "x", "max_tokens": 0}, 422, ("max_tokens",)),
    "several prompts": ({"model": MODEL_NAME, "prompt": ["a", "b"]}, 400,
                        ("one prompt per request",)),
    "token out of vocabulary": ({"model": MODEL_NAME, "prompt": [5, 100000]}, 400,
                                ("100000", "vocabulary")),
    "empty prompt": ({"model": MODEL_NAME, "prompt": []}, 400, ("empty",)),
    "unknown model": ({"model": "gpt-4", "prompt": "x"}, 404, ("gpt-4", MODEL_NAME)),
    "echo": ({"model": MODEL_NAME, "prompt": "x", "echo": True}, 422, ("echo",)),
}


@pytest.mark.parametrize("case", [*BAD, "context", "chat without messages"])
def test_bad_input_gets_its_status_and_the_server_keeps_serving(served, engine,
                                                                case: str) -> None:
    app, _ = served
    path = "/v1/completions"
    if case == "context":
        request, (status, needles) = _context_case(engine)[0], (400, _context_case(engine)[1])
    elif case == "chat without messages":
        request, status, needles = {"model": MODEL_NAME, "messages": []}, 422, ("messages",)
        path = "/v1/chat/completions"
    else:
        request, status, needles = BAD[case]
    response = call(app, "POST", path, request)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for needle in needles:
        assert needle in error["message"], error
    assert "\n" not in error["message"]
    reference = engine.generate("abc", max_new_tokens=5)
    assert answer(call(app, "POST", "/v1/completions", body("abc", 5)), False, False)[0] == \
        reference.text


def test_a_full_queue_answers_429_with_retry_after(engine) -> None:
    app, scheduler = make_app(engine, slots=1, max_queue=1, start=False)
    try:
        ids = encode_prompt(engine.tokenizer, "abc")
        waiting = scheduler.submit(Request(ids, 4))  # the worker is not running: it stays queued
        response = call(app, "POST", "/v1/completions", body("abc", 4))
        assert response.status_code == 429, response.text
        assert int(response.headers["Retry-After"]) >= 1
        assert "queue is full" in response.json()["error"]["message"]
        scheduler.start()
        assert waiting.wait(WAIT_S) is not None
        reference = engine.generate("abc", max_new_tokens=4)
        assert answer(call(app, "POST", "/v1/completions", body("abc", 4)), False, False)[0] == \
            reference.text
    finally:
        scheduler.stop(0)


class SlowPool:
    """A torch pool whose decode step takes at least ``delay`` seconds: a request is surely
    still generating when its client goes away."""

    def __init__(self, pool: Any, delay: float = 0.02) -> None:
        self._pool = pool
        self._delay = delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def decode(self, token_ids: Sequence[int]) -> Any:
        time.sleep(self._delay)
        return self._pool.decode(token_ids)


def _asgi_call(app: Any, payload: dict, disconnect_after_s: float | None) -> list[dict]:
    """POST ``payload`` to /v1/completions as a raw ASGI call; the client disconnects after
    the first body chunk it receives, or ``disconnect_after_s`` seconds. Returns what was sent."""
    sent: list[dict] = []

    async def run() -> None:
        data = json.dumps(payload).encode()
        first_chunk = asyncio.Event()
        started = time.monotonic()
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": data, "more_body": False}
            while True:
                if disconnect_after_s is not None and \
                        time.monotonic() - started >= disconnect_after_s:
                    return {"type": "http.disconnect"}
                if disconnect_after_s is None and first_chunk.is_set():
                    return {"type": "http.disconnect"}
                await asyncio.sleep(0.01)

        async def send(message: dict) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                first_chunk.set()

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                 "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json"),
                                              (b"host", b"test")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await asyncio.wait_for(app(scope, receive, send), WAIT_S)

    asyncio.run(run())
    return sent


def _metric(app: Any, name: str) -> float:
    """The value of sample ``name`` (``base`` or ``base{label="value",...}``) in /metrics."""
    text = call(app, "GET", "/metrics").text
    base, _, rest = name.partition("{")
    labels = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == base and sample.labels == labels:
                return sample.value
    raise AssertionError(f"{name} not in /metrics:\n{text}")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_its_slot(engine, stream: bool) -> None:
    prompt, n = "Hello there, world", 100
    assert engine.generate(prompt, max_new_tokens=n).stop_reason == "max_tokens"
    pool = SlowPool(open_pool(engine, "torch", slots=1))
    app, scheduler = make_app(engine, pool=pool)
    try:
        sent = _asgi_call(app, body(prompt, n, stream=stream), None if stream else 0.4)
        if stream:  # the stream had begun: headers and at least one chunk went out
            assert sent[0]["status"] == 200 and any(m.get("body") for m in sent[1:])
        cancelled = 'kvcompile_requests_total{finish_reason="cancelled"}'
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and _metric(app, cancelled) < 1:
            time.sleep(0.02)
        assert _metric(app, cancelled) == 1
        stats = scheduler.stats()
        assert stats.active == 0 and stats.free == 1 and stats.queued == 0
        assert _metric(app, "kvcompile_slots_free") == 1
        assert stats.generated_tokens < n  # stopped early, not run to the end
        # the freed slot serves the next request
        reference = engine.generate("abc", max_new_tokens=5)
        assert answer(call(app, "POST", "/v1/completions", body("abc", 5)), False, False)[0] == \
            reference.text
    finally:
        scheduler.stop(0)


def test_metrics_models_and_health(engine) -> None:
    app, scheduler = make_app(engine, slots=3)
    try:
        pool = scheduler.pool
        before = _metric(app, "kvcompile_generated_tokens_total")
        prompt_before = _metric(app, "kvcompile_prompt_tokens_total")
        reference = engine.generate("The pass key is", max_new_tokens=7)
        answer(call(app, "POST", "/v1/completions", body("The pass key is", 7)), False, False)
        assert _metric(app, "kvcompile_generated_tokens_total") - before == \
            len(reference.token_ids)
        assert _metric(app, "kvcompile_prompt_tokens_total") - prompt_before == \
            reference.prompt_tokens
        assert _metric(app, "kvcompile_slots") == 3
        assert _metric(app, "kvcompile_slots_active") == 0
        assert _metric(app, "kvcompile_slots_free") == 3
        assert _metric(app, "kvcompile_queue_length") == 0
        assert _metric(app, "kvcompile_kv_bytes") == pool.kv_bytes == 3 * pool.bytes_per_slot
        assert _metric(app, "kvcompile_kv_bytes_per_slot") == pool.bytes_per_slot
        assert _metric(app, "kvcompile_generation_tokens_per_second") > 0
        reason = expected_finish(reference)
        assert _metric(app, f'kvcompile_requests_total{{finish_reason="{reason}"}}') == 1
        call(app, "POST", "/v1/completions", {"model": "nope", "prompt": "x"})
        assert _metric(app, 'kvcompile_requests_refused_total{status="404"}') == 1
        models = call(app, "GET", "/v1/models").json()
        assert [m["id"] for m in models["data"]] == [MODEL_NAME]
        assert call(app, "GET", f"/v1/models/{MODEL_NAME}").json()["id"] == MODEL_NAME
        assert call(app, "GET", "/v1/models/other").status_code == 404
        health = call(app, "GET", "/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert call(app, "GET", "/nowhere").json()["error"]["message"] == "Not Found"
    finally:
        scheduler.stop(0)


def test_shutting_down_answers_503(engine) -> None:
    app, scheduler = make_app(engine)
    scheduler.stop(0)
    response = call(app, "POST", "/v1/completions", body("abc", 3))
    assert response.status_code == 503 and "shutting down" in response.json()["error"]["message"]


def test_the_onnx_pool_serves_the_onnx_engines_tokens(tmp_path_factory) -> None:
    pytest.importorskip("kvcompile.runtime.onnx_pool")
    artifact = build_serving_artifact(tmp_path_factory.mktemp("server-onnx"), onnx=True)
    engine = load(artifact, backend="onnx")
    pool = open_pool(engine, "onnx", slots=2)
    scheduler = Scheduler(pool, engine.tokenizer, engine.eos_token_ids).start()
    app = create_app(scheduler, engine, MODEL_NAME)
    try:
        cases = [(p, 8 + i) for i, p in enumerate(PROMPTS[:4])]
        responses = asyncio.run(_post_all(app, [("POST", "/v1/completions", body(p, n))
                                                for p, n in cases]))
        for (prompt, n), response in zip(cases, responses, strict=True):
            assert answer(response, False, False)[0] == \
                engine.generate(prompt, max_new_tokens=n).text
    finally:
        scheduler.stop(0)
