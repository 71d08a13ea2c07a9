"""The ONNX graphs serve rows of different lengths in one batched cache (issue 21).

Driven with plain ``InferenceSession.run`` and numpy arrays (not the runtime's bindings, so
the pool's in-place path is not its own reference): each prompt is prefilled alone by the
B=1 prefill graph and its state written into one row of batched arrays; the decode graph then
steps every row at once with per-row ``past_length``. Reference: the same prompt alone through
:class:`OnnxEngine` at B=1 (prefill, then one decode step per token). The tiny plan's layout
(4 sinks, compensation, 2 selected, 2 window: capacity 9) puts prompts below sinks + window,
at capacity, and past it, and every row decodes past the ring, the selected slots and into the
compensation mean.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvcompile.runtime import load, onnx_io
from kvcompile.runtime.onnx_backend import OnnxEngine

ATOL = 1e-4  # float32 noise between a B=1 and a batched run of the same row


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 96, size=n)] for n in lengths]


def single_row(engine: OnnxEngine, prompt: list[int], steps: int) -> tuple[list[np.ndarray],
                                                                             list[int]]:
    """The reference: ``prompt`` alone at B=1, greedy for ``steps`` decode steps (EOS not
    special). Returns the logits before each greedy pick (``steps + 1`` of them) and the picks."""
    cache = engine.allocate(1)
    logits = [engine.prefill(np.array([prompt]), [cache])[0]]
    tokens = [int(np.argmax(logits[-1]))]
    for _ in range(steps):
        logits.append(engine.decode_step(np.array([[tokens[-1]]]), cache)[0])
        tokens.append(int(np.argmax(logits[-1])))
    return logits, tokens


class Rows:
    """Batched cache arrays the decode graph steps with ``session.run`` (outputs copied back)."""

    def __init__(self, engine: OnnxEngine, rows: int) -> None:
        self.engine = engine
        self.names = [spec.input_name for spec in engine.cache_specs]
        self.state = {spec.input_name: np.zeros([rows, *spec.shape[1:]], dtype=spec.dtype)
                      for spec in engine.cache_specs}
        self.length = np.zeros(rows, dtype=np.int64)

    def prefill(self, row: int, prompt: list[int]) -> np.ndarray:
        """``prompt`` alone (B=1) into ``row``; the full-head slots past the prompt get large
        junk, as a row's earlier occupant leaves there: the graphs must ignore them."""
        session = self.engine.prefill_session
        names = [output.name for output in session.get_outputs()]
        outputs = session.run(None, {onnx_io.INPUT_IDS: np.array([prompt], dtype=np.int64)})
        found = dict(zip(names, outputs, strict=True))
        for spec in self.engine.cache_specs:
            self.state[spec.input_name][row] = found[spec.output_name][0]
            if spec.part.startswith("full_"):
                junk = np.random.default_rng(row).normal(0, 1e3, size=self.state[
                    spec.input_name][row, :, len(prompt):].shape)
                self.state[spec.input_name][row, :, len(prompt):] = junk
        self.length[row] = len(prompt)
        return found[onnx_io.LOGITS][0]

    def decode(self, tokens: list[int], parked: tuple[int, ...] = ()) -> np.ndarray:
        """One step of every row; ``parked`` rows keep their length (a finished row left in
        the batch, fed again at the same position)."""
        session = self.engine.decode_session
        feed = {onnx_io.INPUT_IDS: np.array(tokens, dtype=np.int64)[:, None],
                onnx_io.PAST_LENGTH: self.length.copy(), **self.state}
        names = [output.name for output in session.get_outputs()]
        found = dict(zip(names, session.run(None, feed), strict=True))
        for spec in self.engine.cache_specs:
            self.state[spec.input_name] = found[spec.output_name]
        self.length += 1
        self.length[list(parked)] -= 1
        return found[onnx_io.LOGITS]


@pytest.fixture(scope="module")
def engine(tiny_onnx_artifact: Path) -> OnnxEngine:
    return load(tiny_onnx_artifact, backend="onnx")


def test_the_tiny_plan_reaches_every_budgeted_boundary(engine: OnnxEngine) -> None:
    """The cases below mean something only if every layer has both kinds of heads and a
    layout with every slot kind."""
    for layer in engine.plan.layers:
        assert layer.full_heads and layer.budgeted_heads and layer.layout is not None
        layout = layer.layout
        assert (layout.sinks, layout.compensation, layout.selected, layout.window) == (4, 1, 2, 2)


def test_rows_of_different_lengths_decode_together_as_each_alone(engine: OnnxEngine) -> None:
    """Four rows, prompts of 1, 4, 9 and 13 tokens (below sinks + window, at and past the
    capacity); row 1 is refilled with a 6-token prompt at step 8 and row 3 with a 25-token one
    at step 14 while the others keep decoding. Every row's logits equal its prompt's B=1 run
    and the greedy picks are the same tokens, through 30 batched steps."""
    steps = 30
    first = prompts(1, [1, 4, 9, 13])
    refills = {8: (1, prompts(2, [6])[0]), 14: (3, prompts(3, [25])[0])}
    every = first + [prompt for _, prompt in refills.values()]
    reference = {tuple(p): single_row(engine, p, steps) for p in every}

    rows = Rows(engine, 4)
    occupant = list(first)
    done = [0] * 4  # decode steps each row's request has taken
    tokens = []
    for row, prompt in enumerate(first):
        logits = rows.prefill(row, prompt)
        np.testing.assert_allclose(logits, reference[tuple(prompt)][0][0], atol=ATOL, rtol=0)
        tokens.append(int(np.argmax(logits)))
    for step in range(steps):
        if step in refills:
            row, prompt = refills[step]
            occupant[row], done[row] = prompt, 0
            logits = rows.prefill(row, prompt)
            np.testing.assert_allclose(logits, reference[tuple(prompt)][0][0], atol=ATOL, rtol=0)
            tokens[row] = int(np.argmax(logits))
        logits = rows.decode(tokens)
        for row in range(4):
            done[row] += 1
            expected_logits, expected_tokens = reference[tuple(occupant[row])]
            assert tokens[row] == expected_tokens[done[row] - 1], (step, row)
            np.testing.assert_allclose(logits[row], expected_logits[done[row]], atol=ATOL,
                                       rtol=0, err_msg=f"step {step} row {row}")
            tokens[row] = int(np.argmax(logits[row]))
            assert tokens[row] == expected_tokens[done[row]], (step, row)
    # every occupant went past the capacity and folded tokens into the compensation slot
    counters = rows.state[onnx_io.past(0, "budget_counters")]
    assert (rows.length > 9 + 2).all() and (counters[:, 3] > 0).all(), counters
    assert rows.length.tolist() == [1 + 30, 6 + 22, 9 + 30, 25 + 16]


def test_a_finished_row_left_in_the_batch_disturbs_no_other(engine: OnnxEngine) -> None:
    """docs/ONNX.md lets a driver keep a finished row in the batch, fed at its unchanged
    ``past_length`` (examples/ort_generate.mjs does): the other rows still equal their B=1 runs."""
    steps = 20
    first = prompts(6, [3, 12])
    reference = [single_row(engine, p, steps) for p in first]
    rows = Rows(engine, 2)
    tokens = [int(np.argmax(rows.prefill(row, p))) for row, p in enumerate(first)]
    for step in range(steps):
        parked = (0,) if step >= 2 else ()
        logits = rows.decode(tokens, parked)
        np.testing.assert_allclose(logits[1], reference[1][0][step + 1], atol=ATOL, rtol=0)
        tokens[1] = int(np.argmax(logits[1]))
        assert tokens[1] == reference[1][1][step + 1]
        if step < 2:
            tokens[0] = int(np.argmax(logits[0]))
    assert rows.length.tolist() == [3 + 2, 12 + steps]
