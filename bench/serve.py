"""Serving at a fixed KV memory: `kvcompile serve` with the artifact's plan vs the uncompressed plan.

The same KV memory (``--kv-memory``, default 256 MiB) holds as many slots as the plan's bytes
per sequence at ``--context`` tokens allow (every slot reserves the whole context). For each
plan the script starts ``kvcompile serve`` as a real process on 127.0.0.1 (a free port), reads
the slots it reports, and drives it with streaming ``/v1/completions`` clients (asyncio +
httpx) at 1, 4, 16 and the server's maximum concurrent clients (levels above the slots only
queue: skipped unless ``--include-queued``); each client sends ``--requests-per-client``
requests in turn.
Measured on the client: aggregate generated tokens/s (all requests' tokens over the level's
wall time), time to first token (request sent -> first text chunk) and inter-token latency
(gaps between streamed chunks) p50/p95, requests completed.

Baseline: ``transformers`` generating the same prompts with its own ``StaticCache`` of
``--context`` tokens per sequence, in one batch of as many sequences as fit the same memory
(none fit: said so).

Prompts are real text (the held-out Python documentation, ``kvcompile.textsource``), exactly
``--prompt-tokens`` tokens each before the server re-tokenizes their text; every request asks
for ``--max-tokens`` greedy tokens. Every loop is bounded: a request count per level, a
per-request timeout and a total ``--deadline`` after which the script stops its servers and
reports what finished.

    python bench/serve.py --markdown
    python bench/serve.py --artifact bench-out/artifact --kv-memory 256MiB --context 4096
"""
from __future__ import annotations

import os

# sleeping OpenMP workers: spinning ones stall every small op on a shared machine (bench/decode.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import numpy as np  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

if TYPE_CHECKING:
    import httpx

MIB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARTIFACT = ROOT / "bench-out" / "artifact"
SHIPPED_PROFILE = ROOT / "profiles" / "smollm2-135m-instruct.yaml"
LEVELS = (1, 4, 16)
HOST = "127.0.0.1"
MODEL_NAME = "kvcompile-bench"
PLANS = {"artifact": "kvcompile artifact", "uncompressed": "kvcompile uncompressed"}
_URL = re.compile(r"(http://127\.0\.0\.1:\d+)")


# ------------------------------------------------------------------------ measurements


@dataclass
class RequestResult:
    """One streamed request as the client saw it (seconds, from the client's clock)."""

    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk carrying text
    text: str = ""
    tokens: int | None = None  # the server's usage.completion_tokens, when it sends one
    finish_reason: str | None = None
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.error is None and self.finish_reason in ("stop", "length")


@dataclass
class Level:
    """One row of the table: a system at one number of concurrent clients."""

    system: str
    slots: int | None  # concurrent sequences that fit the memory
    kv_bytes: int | None
    clients: int
    requests: int
    completed: int = 0
    generated: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def tokens_per_s(self) -> float | None:
        return self.generated / self.seconds if self.seconds > 0 and self.generated else None


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(level: Level, results: list[RequestResult], seconds: float,
              count_tokens: Callable[[str], int]) -> Level:
    """Fill ``level`` from its requests: tokens from the server's usage (else re-tokenized
    text), TTFT per request, inter-token gaps of every request pooled."""
    level.seconds = seconds
    for res in results:
        level.completed += res.completed
        level.generated += res.tokens if res.tokens is not None else count_tokens(res.text)
        if res.chunks:
            level.ttft.append(res.chunks[0] - res.sent)
            level.itl += [b - a for a, b in zip(res.chunks, res.chunks[1:], strict=False)]
    return level


# ------------------------------------------------------------------------ the server


class Server:
    """``kvcompile serve`` as a child process on a free loopback port."""

    def __init__(self, artifact: Path, plan: str, args: argparse.Namespace) -> None:
        self.arguments = ["serve", str(artifact.resolve()),
                        "--backend", "torch", "--device", "cpu", "--host", HOST, "--port", "0",
                        "--kv-memory", args.kv_memory, "--max-context", str(args.context),
                        "--max-queue", str(max(64, 4 * max(LEVELS))), "--plan", plan,
                        "--drain-timeout", "5", "--model-name", MODEL_NAME]
        self.command = [*shlex.split(args.server_command), *self.arguments]
        self.lines: list[str] = []
        self.url: str | None = None
        self.banner = ""  # the start line that named the URL
        self._ready = threading.Event()
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT, env=env)
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout) or self.url is None:
            tail = "".join(self.lines[-20:])
            self.stop()
            raise SystemExit(f"`kvcompile {' '.join(self.arguments)}` printed no URL within {timeout:.0f} s "
                             f"(exit {self.proc.returncode}):\n{tail}")

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:  # ends when the process closes stderr
            self.lines.append(line)
            found = _URL.search(line)
            if found and self.url is None:
                self.url = found.group(1)
                self.banner = line.strip()
                self._ready.set()
        self._ready.set()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (the server drains), then SIGKILL if it has not exited within ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> ``{sample name: value}`` of the unlabelled samples (the server's
    gauges), read with prometheus_client's own parser."""
    return {sample.name: sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if not sample.labels}


def server_slots(metrics: dict[str, float]) -> tuple[int, int]:
    """The slots and KV bytes the server reports (``kvcompile_slots``, ``kvcompile_kv_bytes``)."""
    if "kvcompile_slots" not in metrics or "kvcompile_kv_bytes" not in metrics:
        raise SystemExit("the server's /metrics has no kvcompile_slots / kvcompile_kv_bytes")
    return int(metrics["kvcompile_slots"]), int(metrics["kvcompile_kv_bytes"])


# ------------------------------------------------------------------------ the clients


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, timeout: float) -> RequestResult:
    """One streaming completion; every chunk's arrival time recorded."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    res = RequestResult(sent=time.perf_counter())
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                if response.status_code != 200:
                    res.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                    return res
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    usage = chunk.get("usage")
                    if usage and usage.get("completion_tokens") is not None:
                        res.tokens = int(usage["completion_tokens"])
                    for choice in chunk.get("choices") or ():
                        if choice.get("text"):
                            res.chunks.append(time.perf_counter())
                            res.text += choice["text"]
                        if choice.get("finish_reason"):
                            res.finish_reason = choice["finish_reason"]
    except TimeoutError:
        res.error = f"no answer within {timeout:.0f} s"
    except Exception as exc:  # a broken connection counts as a failed request, not a crash
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def drive(url: str, prompts: list[str], clients: int, per_client: int, max_tokens: int,
                deadline: float) -> tuple[list[RequestResult], float]:
    """``clients`` concurrent clients, each sending ``per_client`` requests in turn (prompts
    taken in order); stops at ``deadline`` (``time.monotonic``)."""
    import httpx

    results: list[RequestResult] = []
    order = iter(range(clients * per_client))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for _ in range(per_client):
            left = deadline - time.monotonic()
            index = next(order, None)
            if index is None or left <= 1:
                return
            results.append(await one_request(client, url, prompts[index % len(prompts)],
                                             max_tokens, left))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return results, time.perf_counter() - start


def wait_healthy(url: str, timeout: float) -> dict[str, float]:
    """Poll ``/health`` until it answers 200 (bounded), then read ``/metrics``."""
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                metrics = httpx.get(f"{url}/metrics", timeout=5)
                return parse_metrics(metrics.text) if metrics.status_code == 200 else {}
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url}/health did not answer 200 within {timeout:.0f} s")


def bench_server(artifact: Path, plan: str, prompts: list[str], args: argparse.Namespace,
                 deadline: float, count_tokens: Callable[[str], int]) -> list[Level]:
    """Start the server for ``plan``, run every concurrency level it holds, stop it."""
    system = PLANS[plan]
    server = Server(artifact, plan, args)
    t0 = time.monotonic()
    server.start(timeout=min(args.startup_timeout, max(1.0, deadline - t0)))
    levels: list[Level] = []
    try:
        metrics = wait_healthy(server.url, timeout=min(60.0, max(1.0, deadline - time.monotonic())))
        slots, kv_bytes = server_slots(metrics)
        log(f"[{plan}] {server.url}: {slots} slots ({server.banner}); up in "
            f"{time.monotonic() - t0:.1f} s")
        held = {c for c in args.concurrency if c <= slots or args.include_queued}
        wanted = sorted(held | {slots})
        for clients in wanted:
            if time.monotonic() > deadline - 5:
                levels.append(Level(system, slots, kv_bytes, clients, 0, note="deadline reached"))
                continue
            results, seconds = asyncio.run(drive(server.url, prompts, clients,
                                                 args.requests_per_client, args.max_tokens, deadline))
            level = summarize(Level(system, slots, kv_bytes, clients, len(results)), results,
                              seconds, count_tokens)
            errors = sorted({r.error for r in results if r.error})
            if errors:
                level.note = "; ".join(errors)[:160]
            elif clients > slots:
                level.note = f"{clients - slots} of {clients} clients queue for a slot"
            levels.append(level)
            log(f"[{plan}] {clients} clients: {level.completed}/{level.requests} done, "
                f"{level.generated} tokens in {seconds:.1f} s")
        for clients in sorted(set(args.concurrency) - held):
            levels.append(Level(system, slots, kv_bytes, clients, 0,
                                note=f"skipped: more clients than {slots} slot{'s' if slots > 1 else ''} only queue"))
    finally:
        code = server.stop()
        log(f"[{plan}] server stopped (exit {code})")
    return levels


# ------------------------------------------------------------------------ transformers


def transformers_baseline(source_model, prompt_ids: list[list[int]], args: argparse.Namespace,
                          kv_memory: int, deadline: float) -> Level:
    """The source model in transformers: one batch of as many sequences as a ``StaticCache``
    of ``--context`` tokens each fits in ``kv_memory``; the same prompts (token ids, equal
    lengths: no padding), exactly ``--max-tokens`` greedy tokens each."""
    import torch
    from decode import load_transformers_model  # bench/ is on sys.path when this script runs
    from transformers import LogitsProcessor, LogitsProcessorList, StaticCache

    from kvcompile.models import load_model

    system = "transformers StaticCache, one batch"
    loaded = load_model(source_model.source)
    if loaded.fingerprint != source_model.fingerprint:
        raise SystemExit(f"the artifact was built from {source_model.name}, but "
                         f"{source_model.source!r} now loads a different model")
    arch = loaded.arch
    per_seq = 2 * arch.n_layers * arch.n_kv_heads * arch.head_dim * args.context * 4  # float32
    batch = min(kv_memory // per_seq, len(prompt_ids))
    if batch < 1:
        return Level(system, 0, None, 0, 0, note=f"no sequence fits: one needs {per_seq / MIB:.0f} MiB")
    if time.monotonic() > deadline - 5:
        return Level(system, batch, batch * per_seq, batch, 0, note="deadline reached")
    model = load_transformers_model(loaded)
    stamps: list[float] = []

    class Clock(LogitsProcessor):
        """Called once per generated position, after that step's forward: its arrival times."""

        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor(prompt_ids[:batch], dtype=torch.long)
    cache = StaticCache(config=model.config, max_cache_len=args.context)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache,
                             max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                             do_sample=False, logits_processor=LogitsProcessorList([Clock()]),
                             pad_token_id=loaded.tokenizer.eos_token_id)
        seconds = time.perf_counter() - start
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                   if isinstance(t, torch.Tensor))
    level = Level(system, batch, kv_bytes or batch * per_seq, batch, batch, completed=batch,
                  generated=(out.shape[1] - ids.shape[1]) * batch, seconds=seconds)
    if stamps:
        level.ttft = [stamps[0] - start] * batch
        level.itl = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    level.note = f"{batch} sequence{'s' if batch > 1 else ''} of {args.context} fit"
    return level


# ------------------------------------------------------------------------ output


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ms(value: float | None) -> str:
    return "—" if value is None else f"{1000 * value:.0f}"


def format_table(levels: list[Level], markdown: bool) -> str:
    header = ["system", "concurrent sequences", "KV MiB", "clients", "requests done",
              "generated tokens", "tokens/s", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms",
              "ITL p95 ms", "note"]
    rows = []
    for lv in levels:
        tps = lv.tokens_per_s
        rows.append([lv.system, "—" if lv.slots is None else str(lv.slots),
                     "—" if lv.kv_bytes is None else f"{lv.kv_bytes / MIB:.3g}",
                     str(lv.clients), f"{lv.completed}/{lv.requests}", str(lv.generated),
                     "—" if tps is None else f"{tps:.2f}", ms(percentile(lv.ttft, 50)),
                     ms(percentile(lv.ttft, 95)), ms(percentile(lv.itl, 50)),
                     ms(percentile(lv.itl, 95)), lv.note or "—"])
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---" if i in (0, len(header) - 1) else "---:"
                                for i in range(len(header))) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda row: "  ".join(c.ljust(w) if i in (0, len(row) - 1) else c.rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths, strict=True)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def ratios(levels: list[Level]) -> str:
    """Artifact over uncompressed: concurrent sequences, and aggregate tokens/s at each
    server's maximum concurrency (clients = its slots)."""
    def at_max(system: str) -> Level | None:
        found = [lv for lv in levels if lv.system == system and lv.slots and lv.clients == lv.slots]
        return found[0] if found else None

    art, unc = at_max(PLANS["artifact"]), at_max(PLANS["uncompressed"])
    if art is None or unc is None:
        return "ratios: a server's maximum-concurrency level did not run"
    seqs = f"{art.slots / unc.slots:.2f}x ({art.slots} vs {unc.slots})"
    if art.tokens_per_s and unc.tokens_per_s:
        tps = (f"{art.tokens_per_s / unc.tokens_per_s:.2f}x ({art.tokens_per_s:.2f} vs "
               f"{unc.tokens_per_s:.2f} tokens/s)")
    else:
        tps = "— (no tokens at a maximum level)"
    return (f"artifact / uncompressed, one run: concurrent sequences {seqs}; aggregate tokens/s "
            f"at maximum concurrency {tps}")


# ------------------------------------------------------------------------ main


def ensure_artifact(path: Path | None) -> Path:
    """``--artifact``, or the shipped profile's artifact (built as `make bench` builds it)."""
    if path is not None:
        return path
    if not (DEFAULT_ARTIFACT / "manifest.yaml").is_file():
        log(f"building {DEFAULT_ARTIFACT} from {SHIPPED_PROFILE.name} (as `make bench` does)")
        subprocess.run([sys.executable, "-m", "kvcompile.cli", "build", "default", "--profile",
                        str(SHIPPED_PROFILE), "-o", str(DEFAULT_ARTIFACT), "--force", "--no-onnx"],
                       check=True, cwd=ROOT, timeout=1800)
    return DEFAULT_ARTIFACT


def make_prompts(tokenizer, count: int, n_tokens: int, seed: int) -> list[list[int]]:
    """``count`` prompts of exactly ``n_tokens`` ids of real text, each from its own start."""
    from kvcompile.textsource import evaluation_paragraphs, haystack_ids

    paragraphs = evaluation_paragraphs()
    return [haystack_ids(tokenizer, paragraphs, n_tokens, seed=f"serve-{seed}-{i}")
            for i in range(count)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, default=None,
                        help="artifact directory (default: build bench-out/artifact from the "
                             "shipped profile, as `make bench` does)")
    parser.add_argument("--kv-memory", default="256MiB", help="KV memory of every system (default 256MiB)")
    parser.add_argument("--context", type=int, default=4096,
                        help="tokens each sequence's slot reserves (default 4096)")
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="tokens per prompt (default 2048)")
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="tokens generated per request (default 256)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(LEVELS),
                        help="concurrent clients (default 1 4 16; each server's maximum is added)")
    parser.add_argument("--requests-per-client", type=int, default=2,
                        help="requests each client sends in turn (default 2)")
    parser.add_argument("--include-queued", action="store_true",
                        help="also run the levels with more clients than slots (they queue)")
    parser.add_argument("--plans", nargs="*", choices=list(PLANS), default=list(PLANS),
                        help="servers to run (default: artifact uncompressed; none: the baseline only)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--deadline", type=float, default=1500.0,
                        help="seconds after which the script stops its servers and reports (default 1500)")
    parser.add_argument("--startup-timeout", type=float, default=300.0,
                        help="seconds a server may take to print its URL (default 300)")
    parser.add_argument("--server-command", default=f"{sys.executable} -m kvcompile.cli",
                        help="how to run the kvcompile CLI (default: this Python's kvcompile)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the baseline (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts' text")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or args.requests_per_client < 1 or args.max_tokens < 1:
        parser.error("--concurrency, --requests-per-client and --max-tokens must be >= 1")
    if args.prompt_tokens < 1 or args.prompt_tokens + args.max_tokens > args.context:
        parser.error(f"--prompt-tokens {args.prompt_tokens} + --max-tokens {args.max_tokens} "
                     f"must fit --context {args.context}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.deadline
    if importlib.util.find_spec("httpx") is None:
        raise SystemExit("bench/serve.py's clients need httpx (it comes with the dev extra: "
                         "pip install -e '.[dev]')")
    import torch
    from transformers import AutoTokenizer

    from kvcompile.runtime.artifact import read_manifest
    from kvcompile.runtime.slots import parse_bytes

    torch.set_num_threads(args.threads)
    kv_memory = parse_bytes(args.kv_memory)
    artifact = ensure_artifact(args.artifact)
    manifest = read_manifest(artifact)
    tokenizer = AutoTokenizer.from_pretrained(str(artifact), local_files_only=True)
    n_prompts = max(args.concurrency) * args.requests_per_client
    prompt_ids = make_prompts(tokenizer, n_prompts, args.prompt_tokens, args.seed)
    prompts = [tokenizer.decode(ids) for ids in prompt_ids]
    resent = [len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts]

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False)) if text else 0

    log(f"# {manifest.source_model.name}, KV memory {args.kv_memory} ({kv_memory} B), context "
        f"{args.context} per sequence, prompts {args.prompt_tokens} tokens of real text "
        f"(re-tokenized by the server: {min(resent)}-{max(resent)}), {args.max_tokens} generated "
        f"tokens per request (greedy), {args.requests_per_client} requests per client, "
        f"clients {' '.join(map(str, args.concurrency))} + each server's slots; CPU "
        f"({os.cpu_count()} cores, {platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    levels: list[Level] = []
    for plan in args.plans:
        levels += bench_server(artifact, plan, prompts, args, deadline, count_tokens)
    if not args.no_transformers:
        levels.append(transformers_baseline(manifest.source_model, prompt_ids, args, kv_memory,
                                            deadline))
        log(f"[transformers] {levels[-1].note}")
    print(format_table(levels, args.markdown))
    print()
    print(ratios(levels))
    log(f"# done; load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
