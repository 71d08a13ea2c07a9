"""``kvcompile serve`` as a real process on a free loopback port, driven by the official
``openai`` client: concurrent streaming and non-streaming completions and chats give the text
``kvcompile run`` prints; SIGTERM with requests in flight lets them finish and exits 0; the
artifact is not written. Plus the command's usage errors (one line, exit 2)."""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from kvcompile.cli import main
from kvcompile.runtime import load
from tests.serving_tiny import MODEL_NAME, build_serving_artifact

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
START_S = 120.0  # bound on the server's start (imports and loading)
CALL_S = 60.0  # bound on each client call and each subprocess


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return build_serving_artifact(tmp_path_factory.mktemp("serve-process"))


def kvcompile(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "kvcompile.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=CALL_S)


def run_text(artifact: Path, prompt: str, max_tokens: int, chat: bool) -> str:
    """What ``kvcompile run`` prints for ``prompt`` (greedy), without its final newline."""
    done = kvcompile("run", str(artifact), "--prompt", prompt, "--max-new-tokens",
                     str(max_tokens), *(["--chat"] if chat else []))
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n")
    return done.stdout[:-1]


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


class Server:
    """``kvcompile serve ARTIFACT --port 0 ...`` in a subprocess; its URL read from stderr."""

    def __init__(self, artifact: Path, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kvcompile.cli", "serve", str(artifact), "--port", "0",
             *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.process.poll() is None, "".join(self.stderr)
                continue
            found = re.search(r"http://127\.0\.0\.1:(\d+) ", line)
            if found:
                self.port = int(found.group(1))
                return
        raise AssertionError("no start line within the bound: " + "".join(self.stderr))

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)
            self.lines.put(line)

    def client(self) -> Any:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused",
                             max_retries=0, timeout=CALL_S)

    def admitted(self) -> int:
        """Requests the server holds (decoding, prefilling or queued), from /metrics."""
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=CALL_S).text
        values = dict(line.split() for line in text.splitlines()
                      if line and not line.startswith("#"))
        return sum(int(float(values[f"kvcompile_{name}"]))
                   for name in ("slots_active", "prefilling", "queue_length"))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=CALL_S)


def ask(client: Any, prompt: str, max_tokens: int, chat: bool, stream: bool) -> tuple[str, str]:
    """(text, finish reason) of one greedy request through the openai client."""
    if chat:
        messages = [{"role": "user", "content": prompt}]
        out = client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                             max_tokens=max_tokens, temperature=0,
                                             stream=stream)
        if not stream:
            return out.choices[0].message.content, out.choices[0].finish_reason
        parts, finish = [], None
        for chunk in out:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish
    out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens,
                                    temperature=0, stream=stream)
    if not stream:
        return out.choices[0].text, out.choices[0].finish_reason
    parts, finish = [], None
    for chunk in out:
        parts.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    return "".join(parts), finish


def test_served_text_is_kvcompile_runs_and_sigterm_drains(artifact: Path) -> None:
    plain, chatted = ("Hello there, world", 14), ("Hi", 12)
    expected = {False: run_text(artifact, *plain, chat=False),
                True: run_text(artifact, *chatted, chat=True)}
    long_prompt, long_tokens = "Hello there, world", 100
    reference = load(artifact).generate(long_prompt, max_new_tokens=long_tokens)
    assert reference.stop_reason == "max_tokens"  # the long requests run their whole length
    before = snapshot(artifact)
    server = Server(artifact, "--slots", "2", "--drain-timeout", "30")
    try:
        client = server.client()
        assert [m.id for m in client.models.list().data] == [MODEL_NAME]
        cases = [(chat, stream) for chat in (False, True) for stream in (False, True)] * 2
        with ThreadPoolExecutor(len(cases)) as pool:
            futures = [pool.submit(ask, client, *(chatted if chat else plain), chat, stream)
                       for chat, stream in cases]
            for (chat, stream), future in zip(cases, futures, strict=True):
                text, _ = future.result(timeout=CALL_S)
                assert text == expected[chat], (chat, stream)

        # SIGTERM while requests run and wait: all of them finish, then the process exits 0
        finished: list[float] = []
        first_chunk = threading.Event()

        def long_stream() -> tuple[str, str]:
            stream = client.completions.create(model=MODEL_NAME, prompt=long_prompt,
                                               max_tokens=long_tokens, temperature=0,
                                               stream=True)
            parts, finish = [], None
            for chunk in stream:
                first_chunk.set()
                parts.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            finished.append(time.monotonic())
            return "".join(parts), finish

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(long_stream) for _ in range(6)]
            assert first_chunk.wait(CALL_S)
            deadline = time.monotonic() + CALL_S
            while time.monotonic() < deadline and server.admitted() < 6:
                time.sleep(0.01)  # every request is in (running or queued) before the signal
            assert server.admitted() == 6
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            results = [future.result(timeout=CALL_S) for future in futures]
        assert results == [(reference.text, "length")] * 6
        assert max(finished) > signalled  # some were still running when the signal came
        assert server.process.wait(timeout=CALL_S) == 0, "".join(server.stderr)
        assert snapshot(artifact) == before  # nothing written to the artifact
    finally:
        server.kill()


@pytest.mark.parametrize("args,message", [
    (["--kv-memory", "lots"], "cannot read 'lots' as a memory size"),
    (["--kv-memory", "1KiB"], "holds no slot"),
    (["--slots", "2", "--kv-memory", "1GiB"], "either --slots N or --kv-memory SIZE"),
    (["--slots", "0"], "--slots must be at least 1"),
    (["--plan", "uncompressed", "--backend", "onnx"], "torch only"),
])
def test_usage_errors_are_one_line_and_exit_2(artifact: Path, args: list[str],
                                              message: str) -> None:
    result = CliRunner().invoke(main, ["serve", str(artifact), "--port", "0", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
