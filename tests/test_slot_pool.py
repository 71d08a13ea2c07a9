"""Rows of different lengths in the torch runtime: chunked prefill, the slot pool, the scheduler.

The oracle everywhere is a request run alone (``Engine.generate`` or a one-row cache): a row
of a mixed batch must give its logits (within float tolerance) and its greedy tokens exactly,
whatever the other rows hold, across every budgeted capacity boundary and slot reuse.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompile.build.artifact import compile_engine
from kvcompile.errors import ContextLengthError
from kvcompile.plan import BudgetLayout, LayerPlan, Plan, Selection
from kvcompile.runtime.cache import selection_scores
from kvcompile.runtime.prefill import ChunkedPrefill, chunk_bounds
from kvcompile.runtime.scheduler import QueueFullError, Request, Sampling, Scheduler
from kvcompile.runtime.slots import PoolError, parse_bytes, slots_for_memory
from kvcompile.runtime.torch_pool import TorchSlotPool, torch_bytes_per_slot
from tests.tiny import save_tokenizer, tiny_loaded

LAYOUT = BudgetLayout(2, 1, 3, 4)  # capacity 10: short prompts and decodes cross every part
NEW_TOKENS = 14


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A tiny llama whose layers keep one full head and budget the others (LAYOUT)."""
    from transformers import AutoTokenizer

    loaded = tiny_loaded("llama", seed=7)
    arch = loaded.arch
    plan = Plan(tuple(LayerPlan((0,), tuple(range(1, arch.n_kv_heads)), LAYOUT)
                      for _ in range(arch.n_layers)), selection=Selection("attention", 4))
    _, engine = compile_engine(loaded, plan, max_context=256)
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(Path(directory))
    engine.tokenizer = AutoTokenizer.from_pretrained(directory)
    engine.eos_token_ids = ()
    engine.prefill_chunk = 8  # prompts of 9+ tokens prefill in several chunks
    return engine


def _prompts(n: int, seed: int) -> list[list[int]]:
    """Prompt lengths around every boundary: inside the sinks, the window, the selected slots,
    and past the capacity; one chunk and several."""
    rnd = random.Random(seed)
    lengths = [1, 2, 5, 7, 9, 10, 11, 17, 26, 40]
    return [[rnd.randrange(3, 90) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


def _alone(engine, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    return engine.generate(prompt, max_new_tokens=n).token_ids


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(0, 64), st.integers(1, 40))
def test_chunk_bounds_cover_the_prompt_with_a_last_chunk_holding_the_observation_window(
        n_tokens, chunk, last_min):
    bounds = chunk_bounds(n_tokens, chunk, last_min)
    assert bounds[0][0] == 0 and bounds[-1][1] == n_tokens
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    assert all(stop > start for start, stop in bounds)
    last = bounds[-1][1] - bounds[-1][0]
    assert last >= min(last_min, n_tokens)
    if chunk > 0:
        assert all(stop - start <= max(chunk, last_min) for start, stop in bounds[:-1])
    else:
        assert len(bounds) == 1


def test_selection_scores_from_the_last_queries_equal_the_whole_prompt_s():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 20, 8, generator=gen)
    k = torch.randn(2, 3, 20, 8, generator=gen)
    whole = selection_scores(q, k, 0.3, "attention", 5)
    torch.testing.assert_close(selection_scores(q[:, :, -7:], k, 0.3, "attention", 5), whole)
    with pytest.raises(ValueError, match="last 5 queries"):
        selection_scores(q[:, :, -3:], k, 0.3, "attention", 5)


@pytest.mark.parametrize("length", [9, 17, 26, 40])
def test_chunked_prefill_equals_one_go(engine, length):
    """The cache state and logits after a chunked prefill equal a one-go prefill's: same
    compressed slots (selection by the last queries), same lengths and counters."""
    rnd = random.Random(length)
    prompt = [rnd.randrange(3, 90) for _ in range(length)]
    one = engine.allocate(1, 64)
    want = engine.prefill(torch.tensor([prompt]), [one])
    chunked = engine.allocate(1, 64)
    job = ChunkedPrefill(engine, prompt, 8, chunked.plan)
    steps = 0
    while job.step():
        steps += 1
    assert steps == len(job.bounds) - 1 >= 1
    got = job.finish(chunked)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert chunked.length == one.length == length
    assert torch.equal(chunked.seen, one.seen)
    for a, b in zip(chunked.layers, one.layers, strict=True):
        assert torch.equal(a.full.length, b.full.length)
        torch.testing.assert_close(a.full.k[:, :, :length], b.full.k[:, :, :length])
        assert torch.equal(a.budgeted.counters, b.budgeted.counters)
        assert torch.equal(a.budgeted.bias, b.budgeted.bias)
        torch.testing.assert_close(a.budgeted.k, b.budgeted.k, atol=1e-5, rtol=1e-5)


def test_generate_prefills_in_chunks_like_the_pool(engine, monkeypatch):
    """``Engine.generate`` goes through ChunkedPrefill, so ``kvcompile run`` equals a server."""
    calls = []
    original = ChunkedPrefill.step

    def counting(self):
        calls.append(self.prompt_tokens)
        return original(self)

    monkeypatch.setattr(ChunkedPrefill, "step", counting)
    engine.generate(_prompts(10, 1)[9], max_new_tokens=2)
    assert len(calls) == 5  # 40 tokens in chunks of 8: four before the last, one False


def test_mixed_length_rows_decode_like_single_rows(engine):
    """Rows prefilled at different lengths, decoded together step by step: each row's logits
    equal its single-row run's at every step, across capacity boundaries, and a released row
    refilled with a new prompt (slot reuse) does not disturb the others."""
    prompts = _prompts(6, 11)
    pool = TorchSlotPool(engine, 4, max_context=96)
    singles = {}
    for i, prompt in enumerate(prompts):  # per-step reference logits of each prompt alone
        cache = engine.allocate(1, 96)
        logits = [engine.prefill(torch.tensor([prompt]), [cache])[0]]
        tokens = []
        for _ in range(NEW_TOKENS):
            tokens.append(int(logits[-1].argmax()))
            logits.append(engine.extend(torch.tensor([[tokens[-1]]]), cache)[0])
        singles[i] = (torch.stack(logits).numpy(), tokens)

    rows: list[list] = []  # [prompt index, step]
    pending = list(range(len(prompts)))
    checked = 0
    for _ in range(200):
        if not pending and not rows:
            break
        if pending and pool.active < pool.slots:
            i = pending.pop(0)
            job = pool.begin(prompts[i])
            while job.step():
                pass
            logits = pool.finish(job)
            np.testing.assert_allclose(logits, singles[i][0][0], atol=1e-4, rtol=1e-4)
            rows.append([i, 0])
        tokens = [singles[i][1][step] for i, step in rows]  # the greedy tokens run alone
        logits = pool.decode(tokens)
        for (i, step), row_logits in zip(rows, logits, strict=True):
            np.testing.assert_allclose(row_logits, singles[i][0][step + 1], atol=1e-4,
                                       rtol=1e-4)
            checked += 1
        for r in rows:
            r[1] += 1
        for row in range(len(rows) - 1, -1, -1):  # prompts leave at different steps
            i, step = rows[row]
            if step >= NEW_TOKENS - (i % 3) * 4:
                moved = pool.release(row)
                last = rows.pop()
                if moved is not None:
                    assert moved == len(rows)
                    rows[row] = last
    assert not rows and not pending and checked > 40
    assert pool.active == 0


def test_scheduler_completes_a_random_arrival_schedule_with_the_sequential_tokens(engine):
    """Requests arrive at seeded random times, more than the slots; each finishes with the
    tokens it gets alone, whatever shares its batch."""
    prompts = _prompts(12, 5)
    rnd = random.Random(21)
    limits = [rnd.randint(1, NEW_TOKENS) for _ in prompts]
    want = [_alone(engine, p, n) for p, n in zip(prompts, limits, strict=True)]
    pool = TorchSlotPool(engine, 3, max_context=96)
    scheduler = Scheduler(pool, engine.tokenizer, (), max_queue=32).start()
    try:
        tickets = []
        for prompt, limit in zip(prompts, limits, strict=True):
            time.sleep(rnd.random() * 0.02)
            tickets.append(scheduler.submit(Request(prompt, limit)))
        results = [ticket.wait(120) for ticket in tickets]
    finally:
        scheduler.stop(drain_s=10)
    assert all(r is not None for r in results)
    assert [r.token_ids for r in results] == want
    assert all(r.finish_reason == "length" for r in results)
    stats = scheduler.stats()
    assert stats.completed == len(prompts) and stats.active == 0 and stats.free == 3
    assert stats.generated_tokens == sum(limits)


def test_scheduler_streams_events_that_add_up_to_the_completion(engine):
    prompt = _prompts(3, 2)[2]
    events = []
    pool = TorchSlotPool(engine, 2, max_context=96)
    scheduler = Scheduler(pool, engine.tokenizer, ()).start()
    try:
        ticket = scheduler.submit(Request(prompt, 9, on_event=events.append))
        done = ticket.wait(60)
    finally:
        scheduler.stop(5)
    assert done is not None and done.finish_reason == "length"
    assert [t for e in events for t in e.token_ids] == done.token_ids == _alone(engine, prompt, 9)
    assert "".join(e.text for e in events) == done.text
    assert [e.finish_reason for e in events][-1] == "length"
    assert all(e.finish_reason is None for e in events[:-1])


def test_scheduler_stops_at_eos_and_at_a_stop_string(engine):
    prompt = _prompts(2, 9)[1]
    tokens = _alone(engine, prompt, 10)
    pool = TorchSlotPool(engine, 2, max_context=96)
    eos = tokens[4]
    first = tokens.index(eos)
    scheduler = Scheduler(pool, engine.tokenizer, (eos,)).start()
    try:
        at_eos = scheduler.submit(Request(prompt, 10)).wait(60)
        text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
        word = text.split()[3]
        stopped = scheduler.submit(Request(prompt, 10, stop=(word,))).wait(60)
    finally:
        scheduler.stop(5)
    assert at_eos.finish_reason == "stop" and at_eos.token_ids == tokens[:first]
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[:text.find(word)]
    assert word not in stopped.text


def test_cancelled_requests_free_their_slots(engine):
    prompts = _prompts(4, 3)
    pool = TorchSlotPool(engine, 2, max_context=200)
    scheduler = Scheduler(pool, engine.tokenizer, ()).start()
    try:
        long = [scheduler.submit(Request(p, 150)) for p in prompts[:3]]  # one waits in line
        deadline = time.monotonic() + 30
        while scheduler.stats().active < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        for ticket in long:
            ticket.cancel()
        results = [ticket.wait(30) for ticket in long]
        assert [r.finish_reason for r in results] == ["cancelled"] * 3
        assert all(len(r.token_ids) < 150 for r in results)
        after = scheduler.submit(Request(prompts[3], 5)).wait(30)
    finally:
        scheduler.stop(5)
    assert after.token_ids == _alone(engine, prompts[3], 5)
    assert pool.active == 0 and scheduler.stats().free == 2


def test_sampling_is_per_request_and_seeded(engine):
    prompt = _prompts(2, 4)[1]
    pool = TorchSlotPool(engine, 3, max_context=96)
    scheduler = Scheduler(pool, engine.tokenizer, ()).start()
    hot = Sampling(temperature=1.5, seed=11)
    try:
        tickets = [scheduler.submit(Request(prompt, 12, hot)),
                   scheduler.submit(Request(prompt, 12)),
                   scheduler.submit(Request(prompt, 12, hot))]
        a, greedy, b = (t.wait(60) for t in tickets)
    finally:
        scheduler.stop(5)
    assert a.token_ids == b.token_ids  # same seed, whatever else is in the batch
    assert greedy.token_ids == _alone(engine, prompt, 12)
    assert a.token_ids != greedy.token_ids


def test_refusals_name_their_numbers(engine):
    pool = TorchSlotPool(engine, 1, max_context=32)
    scheduler = Scheduler(pool, engine.tokenizer, (), max_queue=1)  # not started: nothing runs
    with pytest.raises(ContextLengthError, match=r"\(30 tokens\) plus max_tokens \(5\).*32"):
        scheduler.submit(Request([5] * 30, 5))
    scheduler.submit(Request([5] * 3, 2))
    with pytest.raises(QueueFullError) as full:
        scheduler.submit(Request([5] * 3, 2))
    assert full.value.retry_after >= 1
    with pytest.raises(PoolError, match="at least one slot"):
        TorchSlotPool(engine, 0)


def test_kv_memory_divides_by_the_plan_bytes_per_slot(engine):
    per_slot = torch_bytes_per_slot(engine, 96)
    assert per_slot == engine.allocate(1, max_context=96).nbytes  # predicted == allocated
    slots = slots_for_memory(3 * per_slot + per_slot // 2, per_slot)
    pool = TorchSlotPool(engine, slots, max_context=96)
    assert pool.slots == 3 and pool.kv_bytes == 3 * per_slot == pool.cache.nbytes
    uncompressed = torch_bytes_per_slot(engine, 96, engine.uncompressed_plan())
    assert uncompressed > per_slot
    with pytest.raises(PoolError, match="holds no slot"):
        slots_for_memory(per_slot - 1, per_slot)
    assert parse_bytes("2GiB") == 2 << 30 and parse_bytes("256 MiB") == 256 << 20
    assert parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("4096") == 4096
    for bad in ("", "lots", "-1GiB", "2 GiBs"):
        with pytest.raises(PoolError, match="memory size"):
            parse_bytes(bad)


@pytest.mark.slow
def test_real_model_batched_requests_equal_generate(smollm2):
    """SmolLM2 on the shipped plan: prompts of real text, some long enough to prefill in
    several chunks, served three at a time, give ``Engine.generate``'s greedy tokens."""
    from kvcompile.profile.record import load_profile
    from kvcompile.textsource import encode_text, evaluation_paragraphs

    plan = load_profile(Path(__file__).resolve().parents[1] / "profiles"
                        / "smollm2-135m-instruct.yaml").plan
    _, real = compile_engine(smollm2, plan, max_context=2048)
    real.tokenizer = smollm2.tokenizer
    text = " ".join(evaluation_paragraphs())
    ids = encode_text(smollm2.tokenizer, text)
    prompts = [ids[start:start + length] for start, length in
               ((0, 40), (100, 700), (900, 130), (1200, 1100), (2500, 300))]
    want = [real.generate(p, max_new_tokens=16).token_ids for p in prompts]
    scheduler = Scheduler(TorchSlotPool(real, 3, max_context=1200), smollm2.tokenizer,
                          real.eos_token_ids).start()
    try:
        tickets = [scheduler.submit(Request(p, 16)) for p in prompts]
        got = [t.wait(600) for t in tickets]
    finally:
        scheduler.stop(5)
    assert [g.token_ids[:len(w)] for g, w in zip(got, want, strict=True)] == want
    assert [len(g.token_ids) for g in got] == [len(w) for w in want]


def test_the_torch_pool_and_its_job_satisfy_the_slot_protocols(engine):
    from kvcompile.runtime.slots import PrefillJob, SlotPool
    from tests.test_protocols import conformance

    pool = TorchSlotPool(engine, 1, max_context=32)
    assert conformance(pool, SlotPool) == []
    assert conformance(pool.begin([4, 5]), PrefillJob) == []
