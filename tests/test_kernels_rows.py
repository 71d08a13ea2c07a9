"""Per-row lengths through the Triton kernels: a batch's rows are independent sequences.

Rows of one batch hold sequences of different lengths and budgeted heads in different cache
states, and a finished row is reset and refilled while the others keep decoding (slot reuse,
issue 21). The kernels must give every row what that row gets alone: the reference ops run on
one row (the oracle), and the kernels run on that row alone (``B = 1``: no other row's values
or counters may reach it). Without a GPU the kernels run in Triton's interpreter on CPU, as in
``tests/test_kernels.py`` (``TRITON_INTERPRET=1`` set before the kernels module is imported).
Sizes are small: the interpreter runs one numpy program per grid cell.
"""
from __future__ import annotations

import pytest
import torch

from tests.triton_mode import DEVICE, TOLERANCE  # before the kernels: sets the mode

# isort: split
from kvcompile.plan import BudgetLayout
from kvcompile.runtime import kernels, ops
from kvcompile.runtime import triton_kernels as tk
from kvcompile.runtime.cache import BudgetedBuffer, FullBuffer, compress_prefill
from tests.test_ops import random_bias

SCALE = 0.25
LAYOUT = BudgetLayout(2, 1, 3, 4)  # capacity 10: sinks 0-1, compensation 2, selected 3-5, ring 6-9
DROPPING = BudgetLayout(2, 0, 3, 4)  # no compensation slot: past the selected slots, drop


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def _reference_attention(q, k, v, bias, kv_length) -> torch.Tensor:
    """The reference op on the same values in fp32 on CPU; T = 1, the query is the last key."""
    return ops._budgeted_attention_ref(
        q.float().cpu(), k.float().cpu(), v.float().cpu(),
        None if bias is None else bias.float().cpu(),
        None if kv_length is None else kv_length.cpu(), True, 0, SCALE)




# -- decode attention over full-head buffers filled to different lengths -----------------------

# 100 slots in splits of 32 (block 16): lengths on, just past and just before split boundaries,
# a full row, a single key and an empty row (the reference defines it: output 0)
LENGTHS = [100, 64, 65, 31, 1, 0]


@pytest.mark.parametrize("splits", [1, 4], ids=["one-program", "split-K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_rows_of_different_lengths_equal_rows_alone(
        splits: int, dtype: torch.dtype) -> None:
    """Each row equals the reference on that row alone, and the kernels on that row alone bit
    for bit (same split plan: a row's programs read only its own length and slots). Slots past
    a row's length hold NaN, and so do the output and the split workspace: a kernel that read
    them, or a combine that merged a split past the row's length, would show it."""
    gen = torch.Generator().manual_seed(splits * 7 + (dtype == torch.bfloat16))
    batch, kv_heads, group, slots, head_dim = len(LENGTHS), 2, 3, 100, 16
    q = _randn(gen, batch, kv_heads * group, 1, head_dim, dtype=dtype)
    k = _randn(gen, batch, kv_heads, slots, head_dim, dtype=dtype)
    v = _randn(gen, batch, kv_heads, slots, head_dim, dtype=dtype)
    for row, length in enumerate(LENGTHS):
        k[row, :, length:] = float("nan")
        v[row, :, length:] = float("nan")
    kv_length = torch.tensor(LENGTHS, device=DEVICE)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    partials = tuple(t.fill_(float("nan")) for t in  # a partial no split wrote would show
                     tk.split_workspace(batch * kv_heads, splits, group, head_dim, DEVICE))
    tk.decode_attention(q, k, v, None, kv_length, SCALE, num_splits=splits, block_n=16,
                        out=out, partials=partials)
    tol = TOLERANCE[dtype]
    for row in range(batch):
        one = slice(row, row + 1)
        alone = tk.decode_attention(q[one], k[one], v[one], None, kv_length[one], SCALE,
                                    num_splits=splits, block_n=16)
        assert torch.equal(out[one], alone), f"row {row} (length {LENGTHS[row]})"
        want = _reference_attention(q[one], k[one], v[one], None, kv_length[one])
        torch.testing.assert_close(out[one].float().cpu(), want, rtol=tol, atol=tol)
    assert torch.equal(out[LENGTHS.index(0)].float().cpu(), torch.zeros(q.shape[1:]))


def test_registered_attention_plans_its_own_splits_over_mixed_lengths(serving_triton) -> None:
    """Through the op's CUDA implementation (split count planned from shapes, not lengths):
    rows of different lengths in a buffer past SINGLE_PROGRAM_SLOTS equal the reference."""
    gen = torch.Generator().manual_seed(3)
    slots = tk.SINGLE_PROGRAM_SLOTS + 88
    assert tk.plan_splits(3, slots, tk.sm_count(DEVICE)) > 1
    q = _randn(gen, 3, 2, 1, 16)
    k, v = _randn(gen, 3, 1, slots, 16), _randn(gen, 3, 1, slots, 16)
    kv_length = torch.tensor([slots, tk.MIN_SPLIT_SLOTS + 1, 2], device=DEVICE)
    out = kernels.attention_impl(q, k, v, None, kv_length, True, 0, SCALE)
    torch.testing.assert_close(out.cpu(), _reference_attention(q, k, v, None, kv_length),
                               rtol=1e-5, atol=1e-5)
    assert serving_triton["attention"] == 1


# -- the cache update with every row in a different state ----------------------------------------

def _mixed_counters(layout: BudgetLayout) -> list[list[int]]:
    """One row per state of the decode rule: filling the sinks; filling the ring; ring full,
    moving its oldest token into a selected slot; the last selected slot; the first fold (or
    the first drop without compensation); folding into a mean of several (or dropping)."""
    s, c, h, w = layout.sinks, layout.compensation, layout.selected, layout.window
    return [[1, 0, 0, 0], [s, 2, 0, 0], [s, w, 0, 0], [s, w + h - 1, h - 1, 0],
            [s, w + h, h, 0], [s, w + h + 5, h, 5 * c]]


def _random_state(gen: torch.Generator, layout: BudgetLayout, dtype: torch.dtype):
    rows, heads, head_dim = len(_mixed_counters(layout)), 3, 8
    shape = (rows, heads, layout.capacity, head_dim)
    return [_randn(gen, *shape, dtype=dtype), _randn(gen, *shape, dtype=dtype),
            random_bias(gen, shape[:3]).to(DEVICE),
            torch.tensor(_mixed_counters(layout), device=DEVICE)]


@pytest.mark.parametrize("layout", [LAYOUT, DROPPING], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cache_update_rows_in_different_states_equal_rows_alone(layout: BudgetLayout,
                                                                dtype: torch.dtype) -> None:
    """Every step, the batched kernel equals the reference on the batch and the kernel on each
    row alone, bit for bit (buffers, bias, counters), over enough steps that every row moves
    on to its next states."""
    gen = torch.Generator().manual_seed(layout.compensation * 2 + (dtype == torch.float16))
    state = _random_state(gen, layout, dtype)
    rows, heads, _, head_dim = state[0].shape
    reference = [t.cpu().clone() for t in state]
    alone = [[t[row:row + 1].clone() for t in state] for row in range(rows)]
    args = (layout.sinks, layout.compensation, layout.selected, layout.window)
    for _ in range(layout.capacity // 2):
        k_new = _randn(gen, rows, heads, 1, head_dim, dtype=dtype)
        v_new = _randn(gen, rows, heads, 1, head_dim, dtype=dtype)
        tk.cache_update(*state, k_new, v_new, *args)
        ops._budgeted_cache_update_ref(*reference, k_new.cpu(), v_new.cpu(), *args)
        for got, want in zip(state, reference, strict=True):
            assert torch.equal(got.cpu(), want)
        for row in range(rows):
            one = slice(row, row + 1)
            tk.cache_update(*alone[row], k_new[one], v_new[one], *args)
            for got, want in zip(state, alone[row], strict=True):
                assert torch.equal(got[one], want), f"row {row}"
    counters = state[3].cpu()
    assert counters[:, 3].max() > 0 if layout.compensation else counters[:, 3].max() == 0


# -- a decode of independent rows, with slot reuse ------------------------------------------------

class _Model:
    """A one-layer stand-in for a model: token -> q, k, v for one full and one budgeted KV head
    (group 2), attention outputs -> logits. Greedy decoding closes the loop, so a row that got
    another row's values would pick other tokens."""

    VOCAB, DIM, GROUP = 23, 8, 2

    def __init__(self, gen: torch.Generator) -> None:
        self.embed = torch.randn(self.VOCAB, self.DIM, generator=gen)
        self.wq = torch.randn(2 * self.GROUP, self.DIM, self.DIM, generator=gen) / 3
        self.wk = torch.randn(2, self.DIM, self.DIM, generator=gen) / 3
        self.wv = torch.randn(2, self.DIM, self.DIM, generator=gen) / 3
        self.out = torch.randn(2 * self.GROUP * self.DIM, self.VOCAB, generator=gen)

    def qkv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``tokens [B, T]`` -> q ``[B, 4, T, D]``, k, v ``[B, 2, T, D]`` (full head first)."""
        x = self.embed[tokens.cpu()]
        project = lambda w: torch.einsum("btd,hde->bhte", x, w).to(DEVICE)  # noqa: E731
        return project(self.wq), project(self.wk), project(self.wv)

    def logits(self, attended: torch.Tensor) -> torch.Tensor:
        """``[B, 4, 1, D]`` -> ``[B, VOCAB]``."""
        return attended.float().cpu().reshape(attended.shape[0], -1) @ self.out


class _Row:
    """One sequence decoded alone with the reference ops (``B = 1``): the oracle."""

    def __init__(self, model: _Model, prompt: torch.Tensor, scores: torch.Tensor,
                 max_context: int) -> None:
        self.model = model
        q, k, v = model.qkv(prompt[None])
        self.full = FullBuffer.empty(1, 1, max_context, model.DIM, device=DEVICE)
        self.full.write(k[:, :1], v[:, :1])
        self.budgeted = compress_prefill(k[:, 1:], v[:, 1:], scores[None], LAYOUT)
        self.next_token = int(prompt[-1]) if len(prompt) else 0

    def step(self, token: int) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self.model.qkv(torch.tensor([[token]]))
        g = self.model.GROUP
        self.full.write(k[:, :1], v[:, :1])
        ops._budgeted_cache_update_ref(self.budgeted.k, self.budgeted.v, self.budgeted.bias,
                                       self.budgeted.counters, k[:, 1:], v[:, 1:], LAYOUT.sinks,
                                       LAYOUT.compensation, LAYOUT.selected, LAYOUT.window)
        full = ops._budgeted_attention_ref(q[:, :g], self.full.k, self.full.v, None,
                                           self.full.length, True, 0, SCALE)
        budget = ops._budgeted_attention_ref(q[:, g:], self.budgeted.k, self.budgeted.v,
                                             self.budgeted.bias, None, False, 0, SCALE)
        return full, budget


def test_mixed_length_decode_with_slot_reuse_equals_each_row_alone(serving_triton) -> None:
    """Three rows from prompts of 1, 6 and 13 tokens (sinks filling; ring just full; past the
    selected slots, folding) decode 16 greedy steps through the kernels (the ops' CUDA
    implementations), batched. Row 2 is reset at step 4 and refilled from nothing (an empty
    prompt: its first tokens go to the sinks again); row 1 is reset at step 8 and refilled with
    a new 5-token prompt (ring not yet full). After every step each row's attention outputs (full and budgeted heads)
    equal the reference on that row alone within 1e-5, its greedy token is the same, and its
    cache state (full-head keys/values/length, budgeted slots, bias, counters) is bit for bit
    the reference's. Every row crosses every capacity boundary (ring, selected, compensation)."""
    gen = torch.Generator().manual_seed(21)
    model = _Model(gen)
    max_context, g, d = 40, model.GROUP, model.DIM
    prompts = [torch.randint(0, model.VOCAB, (n,), generator=gen) for n in (1, 6, 13)]
    refills = {4: (2, torch.randint(0, model.VOCAB, (0,), generator=gen)),
               8: (1, torch.randint(0, model.VOCAB, (5,), generator=gen))}
    scores = lambda n: torch.rand(1, n, generator=gen).to(DEVICE)  # noqa: E731  selection

    batch = len(prompts)
    full = FullBuffer.empty(batch, 1, max_context, d, device=DEVICE)
    budgeted = BudgetedBuffer.empty(batch, 1, d, LAYOUT, device=DEVICE)
    rows: list[_Row] = []

    def fill(row: int, prompt: torch.Tensor) -> None:
        """(Re)start sequence ``row`` in its slot: zero the slot, then its prompt's state."""
        view = budgeted.rows(row, row + 1)  # the slot pool's row views (StaticKVCache.rows)
        view.reset()  # bias -inf, counters 0, k/v 0 (compress_prefill resets too: done twice)
        full_row = full.rows(row, row + 1)
        full_row.reset()  # length 0: the old slots are no keys any more
        full_row.k.zero_()  # (zeroed too, so the buffers compare bit for bit with a fresh run)
        full_row.v.zero_()
        row_scores = scores(len(prompt))
        alone = _Row(model, prompt, row_scores, max_context)
        if len(prompt):
            _, k, v = model.qkv(prompt[None])
            full.k[row, :, :len(prompt)] = k[0, :1]
            full.v[row, :, :len(prompt)] = v[0, :1]
            full.length[row] = len(prompt)
            compress_prefill(k[:, 1:], v[:, 1:], row_scores[None], LAYOUT, out=view)
        if row < len(rows):
            rows[row] = alone
        else:
            rows.append(alone)

    for row, prompt in enumerate(prompts):
        fill(row, prompt)
    tokens = [row.next_token for row in rows]
    seen_states: set[tuple[int, int]] = set()
    for step in range(16):
        if step in refills:
            row, prompt = refills[step]
            fill(row, prompt)
            tokens[row] = rows[row].next_token
        q, k, v = model.qkv(torch.tensor(tokens)[:, None])
        full.write(k[:, :1], v[:, :1])  # each row at its own length
        kernels.cache_update_impl(budgeted.k, budgeted.v, budgeted.bias, budgeted.counters,
                                  k[:, 1:], v[:, 1:], LAYOUT.sinks, LAYOUT.compensation,
                                  LAYOUT.selected, LAYOUT.window)
        out_full = kernels.attention_impl(q[:, :g], full.k, full.v, None, full.length, True, 0,
                                          SCALE)
        out_budget = kernels.attention_impl(q[:, g:], budgeted.k, budgeted.v, budgeted.bias,
                                            None, False, 0, SCALE)
        logits = model.logits(torch.cat([out_full, out_budget], dim=1))
        for row, alone in enumerate(rows):
            one = slice(row, row + 1)
            want_full, want_budget = alone.step(tokens[row])
            torch.testing.assert_close(out_full[one], want_full, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out_budget[one], want_budget, rtol=1e-5, atol=1e-5)
            want_token = int(model.logits(torch.cat([want_full, want_budget], dim=1)).argmax())
            assert int(logits[row].argmax()) == want_token, f"step {step}, row {row}"
            tokens[row] = want_token
            view = budgeted.rows(row, row + 1)
            for got, want in ((full.length[one], alone.full.length), (full.k[one], alone.full.k),
                              (full.v[one], alone.full.v), (view.k, alone.budgeted.k),
                              (view.v, alone.budgeted.v), (view.bias, alone.budgeted.bias),
                              (view.counters, alone.budgeted.counters)):
                assert torch.equal(got, want), f"step {step}, row {row}"
            sink_used, pushed, sel_used, comp_n = view.counters[0].tolist()
            seen_states.add((row, (sink_used == LAYOUT.sinks) + (pushed > LAYOUT.window)
                             + (sel_used == LAYOUT.selected) + (comp_n > 0)))
    assert {(row, 4) for row in range(batch)} <= seen_states  # every row folded in the end
    assert {(2, state) for state in range(5)} <= seen_states  # the row refilled from nothing
    assert {(1, state) for state in range(1, 5)} <= seen_states
    assert serving_triton == {"attention": 32, "update": 16, "quantized attention": 0,
                              "quantized append": 0}  # the kernels served every call
