"""The ONNX slot pool (runtime/onnx_pool.py) on a tiny artifact.

References: ``OnnxEngine.generate`` on each prompt alone (greedy tokens, what ``kvcompile run
--backend onnx`` runs), the B=1 ``OnnxCache`` (bytes, prefilled state), and onnxruntime's own
report of a scatter that had to copy its input (the in-place check).
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kvcompile.errors import ContextLengthError, KVCompileError
from kvcompile.memory import plan_state_bytes
from kvcompile.runtime import load, onnx_io
from kvcompile.runtime.onnx_backend import OnnxBackendError, OnnxEngine
from kvcompile.runtime.onnx_pool import OnnxSlotPool, onnx_bytes_per_slot
from kvcompile.runtime.slots import PoolError, slots_for_memory
from tests.test_onnx_rows import prompts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine(tiny_onnx_artifact: Path) -> OnnxEngine:
    return load(tiny_onnx_artifact, backend="onnx")


def test_bytes_per_slot_is_one_rows_kv_memory_before_anything_is_allocated(
        engine: OnnxEngine) -> None:
    per_slot = onnx_bytes_per_slot(engine)
    assert per_slot == engine.allocate(1).nbytes  # OnnxCache's own count, from its OrtValues
    pool = OnnxSlotPool(engine, 3)
    assert pool.bytes_per_slot == per_slot and pool.kv_bytes == 3 * per_slot
    # every state tensor, and a length per layer with full heads (``past_length`` is shared)
    allocated = sum(array.nbytes for array in pool.arrays.values())
    lengths = 3 * 8 * sum(bool(layer.full_heads) for layer in engine.plan.layers)
    assert allocated + lengths == pool.kv_bytes
    head_dim = next(spec.shape[3] for spec in engine.cache_specs if spec.part == "budget_key")
    assert per_slot == plan_state_bytes(engine.plan, head_dim, 96, 4)  # the one definition
    assert slots_for_memory(pool.kv_bytes + per_slot - 1, per_slot) == 3
    assert pool.max_context == engine.graph_context == 96


def test_prefill_lands_in_the_rows_memory_and_decode_updates_it_in_place(
        tiny_onnx_artifact: Path, engine: OnnxEngine, capfd) -> None:
    """Row 1's arrays after prefill hold what a B=1 cache holds; decode steps write them in
    place (onnxruntime warns when a bound TensorScatter copies its input; it never does here,
    and the array under each OrtValue is still the pool's)."""
    loud = OnnxEngine(tiny_onnx_artifact, engine.plan, engine.tokenizer, engine.graph_context,
                      device="cpu", log_severity=2)
    pool = OnnxSlotPool(loud, 2)
    first, second = prompts(4, [5, 11])
    pool.finish(pool.begin(first))
    logits = pool.finish(pool.begin(second))
    cache = engine.allocate(1)
    np.testing.assert_allclose(logits, engine.prefill(np.array([second]), [cache])[0],
                               atol=1e-5, rtol=0)
    for spec, value in cache.values.items():
        np.testing.assert_allclose(pool.arrays[spec][1:2], value.numpy(), atol=1e-5, rtol=0)
    assert pool.past_length.tolist() == [5, 11]
    capfd.readouterr()
    before = {spec: array.copy() for spec, array in pool.arrays.items()}
    for token in (7, 8, 9):
        pool.decode([token, token])
        engine.decode_step(np.array([[token]]), cache)
    assert "in-place optimization not activated" not in capfd.readouterr().err
    assert pool.past_length.tolist() == [8, 14]
    for spec, value in cache.values.items():
        assert not np.array_equal(pool.arrays[spec][1:2], before[spec][1:2])  # written
        np.testing.assert_allclose(pool.arrays[spec][1:2], value.numpy(), atol=1e-4, rtol=0)


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    expected: list[int]
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    next_token: int = -1


def test_a_seeded_random_schedule_gives_each_request_its_generate_tokens(
        engine: OnnxEngine) -> None:
    """Ten requests (prompts of 1 to 25 tokens, 1 to 30 new tokens) through 3 slots: admitted
    at random moments, decoded together, released in random order as they finish (the last
    row moving into the freed one). Each gets exactly ``engine.generate``'s greedy tokens."""
    rng = np.random.default_rng(21)
    lengths = [1, 25, 4, 9, 13, 6, 2, 17, 10, 3]
    queue = [Request(prompt, int(n), engine.generate(prompt, max_new_tokens=int(n)).token_ids)
             for prompt, n in zip(prompts(5, lengths), rng.integers(1, 31, size=10), strict=True)]
    every = list(queue)
    assert sum(len(r.prompt) + len(r.expected) > 9 + 4 for r in every) >= 5  # past capacity
    pool = OnnxSlotPool(engine, 3)
    rows: list[Request] = []
    moves = 0

    def pick(request: Request, logits: np.ndarray) -> None:
        """``decode_loop``'s rule: stop at EOS or at max_new_tokens, else feed the token."""
        token = int(np.argmax(logits))
        if token in engine.eos_token_ids:
            request.done = True
            return
        request.tokens.append(token)
        request.done = len(request.tokens) == request.max_new_tokens
        request.next_token = token

    for _ in range(1000):  # bounded: ~130 decode steps and 10 admissions are needed
        if not queue and not rows:
            break
        if queue and pool.active < pool.slots and (not rows or rng.random() < 0.4):
            request = queue.pop(0)
            job = pool.begin(request.prompt)
            assert job.prompt_tokens == len(request.prompt) and not job.step()
            pick(request, pool.finish(job))
            rows.append(request)
        else:
            logits = pool.decode([request.next_token for request in rows])
            assert logits.shape == (len(rows), engine.vocab_size)
            for request, row_logits in zip(rows, logits, strict=True):
                pick(request, row_logits)
        while finished := [row for row, request in enumerate(rows) if request.done]:
            row = int(rng.choice(finished))
            moved = pool.release(row)
            last = rows.pop()
            if moved is None:
                assert row == len(rows)
            else:
                assert moved == len(rows)
                rows[row] = last
                moves += 1
            assert pool.active == len(rows)
    assert not queue and not rows and moves > 0
    for request in every:
        assert request.tokens == request.expected, request.prompt


def test_bad_calls_are_refused_with_one_line(tiny_onnx_artifact: Path) -> None:
    short = load(tiny_onnx_artifact, backend="onnx", max_context=12)
    pool = OnnxSlotPool(short, 1)
    assert pool.max_context == 12
    with pytest.raises(ContextLengthError, match="13 tokens"):
        pool.begin(list(range(3, 16)))
    with pytest.raises(ContextLengthError, match="empty"):
        pool.begin([])
    pool.finish(pool.begin(list(range(3, 14))))  # 11 tokens
    pool.decode([5])  # the 12th
    with pytest.raises(ContextLengthError, match="row 0 holds 12 tokens"):
        pool.decode([5])
    with pytest.raises(PoolError, match="all 1 slots are in use"):
        pool.finish(pool.begin([4]))
    with pytest.raises(PoolError, match="one token per active row"):
        pool.decode([5, 6])
    assert pool.release(0) is None and pool.active == 0
    with pytest.raises(PoolError, match="row 0 is not active"):
        pool.release(0)
    with pytest.raises(PoolError, match="at least one slot"):
        OnnxSlotPool(short, 0)
    with pytest.raises(OnnxBackendError, match="--backend torch") as info:
        OnnxSlotPool(SimpleNamespace(device="cuda"), 2)  # type: ignore[arg-type]
    assert "\n" not in str(info.value) and isinstance(info.value, KVCompileError)


def test_the_pool_module_imports_no_torch() -> None:
    script = "import sys\nimport kvcompile.runtime.onnx_pool\nprint('torch' in sys.modules)\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_pool_names_match_the_graphs(engine: OnnxEngine) -> None:
    """Every cache tensor the decode graph declares has one array in the pool, in graph order."""
    pool = OnnxSlotPool(engine, 1)
    inputs = [i.name for i in engine.decode_session.get_inputs()]
    assert inputs[:2] == [onnx_io.INPUT_IDS, onnx_io.PAST_LENGTH]
    assert [spec.input_name for spec in pool.arrays] == inputs[2:]


def test_the_pool_and_its_job_satisfy_the_slot_protocols(engine: OnnxEngine) -> None:
    from kvcompile.runtime.slots import PrefillJob, SlotPool
    from tests.test_protocols import conformance

    pool = OnnxSlotPool(engine, 1)
    assert conformance(pool, SlotPool) == []
    assert conformance(pool.begin([4, 5]), PrefillJob) == []
