"""The Triton kernels against the plain-torch reference of the ``kvcompile`` ops.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set here before
the kernels module is imported) on CPU tensors; with one, compiled, on CUDA, where the tests at
the end also check the registered ops, CUDA-graph capture and a whole decode. Inputs are random
everywhere (empty slots hold random values the kernels must ignore, never zeros), outputs and
workspaces are poisoned with NaN before each run, capacities are not powers of two, and the
batch rows are in different cache states. Tolerances: fp32 1e-5; fp16/bf16 1e-2 against the
reference run in fp32 on the same values (the kernels upcast every load to fp32).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.triton_mode import CUDA, DEVICE, TOLERANCE  # before the kernels: sets the mode

# isort: split
from kvcompile.plan import BudgetLayout, LayerPlan, Plan
from kvcompile.runtime import kernels, ops
from kvcompile.runtime import triton_kernels as tk
from tests import compile_kernels
from tests.test_ops import random_bias

ROOT = Path(__file__).resolve().parents[1]
HALF = (torch.float16, torch.bfloat16)
SCALE = 0.125


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def _qkv(gen: torch.Generator, batch: int, q_heads: int, t: int, kv_heads: int, slots: int,
         head_dim: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Random queries ``[B, Hq, T, D]`` and keys, values ``[B, Hkv, S, D]``, drawn in that order."""
    return (_randn(gen, batch, q_heads, t, head_dim, dtype=dtype),
            _randn(gen, batch, kv_heads, slots, head_dim, dtype=dtype),
            _randn(gen, batch, kv_heads, slots, head_dim, dtype=dtype))


def _poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _reference(q, k, v, bias, kv_length) -> torch.Tensor:
    """The reference op on the same values in fp32, on CPU (T = 1: the query is the last key)."""
    up = [t.float().cpu() for t in (q, k, v)]
    return ops._budgeted_attention_ref(*up, None if bias is None else bias.float().cpu(),
                                       None if kv_length is None else kv_length.cpu(),
                                       True, 0, SCALE)


def _assert_matches(out: torch.Tensor, q, k, v, bias, kv_length) -> None:
    assert out.dtype == q.dtype and out.shape == q.shape
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(out.float().cpu(), _reference(q, k, v, bias, kv_length),
                               rtol=tol, atol=tol)


def _budgeted_bias(gen: torch.Generator, batch: int, heads: int, slots: int) -> torch.Tensor:
    """0 / ln n / -inf per slot; row 1 has a compensation slot with a large count, the last row
    is empty (every slot -inf: the output must be 0, not NaN)."""
    bias = random_bias(gen, (batch, heads, slots))
    bias[1, :, 3] = torch.log(torch.tensor(5000.0))
    bias[-1] = float("-inf")
    return bias.to(DEVICE)


# -- decode attention over a budgeted group: one program per (row, KV head) ----------------------

@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_grouped_decode_matches_reference(dtype: torch.dtype, group: int) -> None:
    gen = torch.Generator().manual_seed(group * 10 + [torch.float32, *HALF].index(dtype))
    batch, kv_heads, slots, head_dim = 3, 2, 37, 64  # 37 slots: tiles of 16, the last partial
    q, k, v = _qkv(gen, batch, kv_heads * group, 1, kv_heads, slots, head_dim, dtype=dtype)
    bias = _budgeted_bias(gen, batch, kv_heads, slots)
    out = _poisoned(q.shape, dtype)
    tk.decode_attention(q, k, v, bias, None, SCALE, num_splits=1, block_n=16, out=out)
    _assert_matches(out, q, k, v, bias, None)
    assert torch.equal(out[-1].float().cpu(), torch.zeros(q.shape[1:]))


def test_grouped_decode_masks_a_head_dim_that_is_not_a_power_of_two() -> None:
    gen = torch.Generator().manual_seed(5)
    q, k, v = _qkv(gen, 2, 6, 1, 2, 21, 80)  # head dim 80 -> 128 lanes, 48 masked
    bias = _budgeted_bias(gen, 2, 2, 21)
    out = _poisoned(q.shape, torch.float32)
    tk.decode_attention(q, k, v, bias, None, SCALE, num_splits=1, block_n=16, out=out)
    _assert_matches(out, q, k, v, bias, None)


def test_grouped_decode_masks_by_length_in_one_program() -> None:
    """A full-head buffer short enough for one program per (row, KV head)."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = _qkv(gen, 3, 8, 1, 2, 45, 64)
    kv_length = torch.tensor([45, 17, 0], device=DEVICE)
    out = _poisoned(q.shape, torch.float32)
    tk.decode_attention(q, k, v, None, kv_length, SCALE, num_splits=1, block_n=16, out=out)
    _assert_matches(out, q, k, v, None, kv_length)


# -- split-K (flash-decoding) over the full heads' long buffers ---------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_split_decode_matches_reference(dtype: torch.dtype, group: int) -> None:
    """Rows filled to different lengths of a 150-slot buffer cut into 5 splits of 32: a full
    row, one ending inside a split, one with a single key, one with none (all its splits exit
    early). The workspace is NaN: a partial the combine reads but no split wrote shows."""
    gen = torch.Generator().manual_seed(group)
    batch, kv_heads, slots, head_dim = 4, 2, 150, 64
    q, k, v = _qkv(gen, batch, kv_heads * group, 1, kv_heads, slots, head_dim, dtype=dtype)
    kv_length = torch.tensor([150, 70, 1, 0], device=DEVICE)
    out = _poisoned(q.shape, dtype)
    partials = tuple(t.fill_(float("nan")) for t in
                     tk.split_workspace(batch * kv_heads, 5, group, head_dim, DEVICE))
    tk.decode_attention(q, k, v, None, kv_length, SCALE, num_splits=5, block_n=16, out=out,
                        partials=partials)
    _assert_matches(out, q, k, v, None, kv_length)
    assert torch.equal(out[3].float().cpu(), torch.zeros(q.shape[1:]))


def test_split_decode_with_bias_and_length() -> None:
    """Both masks at once, and a split whose every slot is -inf (its partial weighs 0)."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = _qkv(gen, 3, 6, 1, 2, 100, 64)
    bias = _budgeted_bias(gen, 3, 2, 100)
    bias[0, :, 32:64] = float("-inf")
    kv_length = torch.tensor([100, 50, 90], device=DEVICE)
    out = _poisoned(q.shape, torch.float32)
    tk.decode_attention(q, k, v, bias, kv_length, SCALE, num_splits=4, block_n=16, out=out)
    _assert_matches(out, q, k, v, bias, kv_length)


def test_many_splits_merge_in_several_combine_blocks() -> None:
    """More splits than one combine iteration merges (32): the running merge across blocks."""
    gen = torch.Generator().manual_seed(10)
    q, k, v = _qkv(gen, 1, 3, 1, 1, 1100, 32)
    kv_length = torch.tensor([1037], device=DEVICE)
    out = _poisoned(q.shape, torch.float32)
    tk.decode_attention(q, k, v, None, kv_length, SCALE, num_splits=69, block_n=16, out=out)
    _assert_matches(out, q, k, v, None, kv_length)


def test_split_count_follows_its_contract() -> None:
    """One program up to SINGLE_PROGRAM_SLOTS; beyond, splits of >= MIN_SPLIT_SLOTS slots,
    enough for PROGRAMS_PER_SM programs per SM unless the buffer runs out of splits."""
    assert tk.plan_splits(1, tk.SINGLE_PROGRAM_SLOTS, 132) == 1
    for programs, slots in ((1, 131072), (8, 32768), (3, 4096), (64, 4096), (1024, 131072)):
        splits = tk.plan_splits(programs, slots, 132)
        most = -(-slots // tk.MIN_SPLIT_SLOTS)
        assert 1 <= splits <= most
        assert programs * splits >= tk.PROGRAMS_PER_SM * 132 or splits == most


# -- the cache update --------------------------------------------------------------------------

LAYOUTS = [BudgetLayout(3, 1, 4, 5), BudgetLayout(2, 0, 3, 6), BudgetLayout(0, 1, 0, 7),
           BudgetLayout(4, 0, 0, 3)]


def _update_state(gen: torch.Generator, layout: BudgetLayout, dtype: torch.dtype):
    """Three rows in different states: filling the sinks; ring full with selected slots left;
    folding into a compensation mean that already counts tokens."""
    batch, heads, head_dim = 3, 3, 24  # 3 heads and head dim 24: padded tile rows and lanes
    shape = (batch, heads, layout.capacity, head_dim)
    k_buf, v_buf = _randn(gen, *shape, dtype=dtype), _randn(gen, *shape, dtype=dtype)
    bias = random_bias(gen, shape[:3]).to(DEVICE)
    s, c, h, w = layout.sinks, layout.compensation, layout.selected, layout.window
    counters = torch.tensor([[0, 0, 0, 0], [s, w, max(0, h - 2), 0], [s, 2 * w + 1, h, 6 * c]],
                            device=DEVICE)
    return [k_buf, v_buf, bias, counters]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cache_update_is_bit_identical_to_reference(layout: BudgetLayout,
                                                    dtype: torch.dtype) -> None:
    """3 x capacity steps from mixed row states: every buffer, bias and counter equal bit for
    bit after every step (fp16 too: its fp32 -> fp16 rounding is exact in the interpreter)."""
    gen = torch.Generator().manual_seed(layout.capacity)
    state = _update_state(gen, layout, dtype)
    reference = [t.cpu().clone() for t in state]
    args = (layout.sinks, layout.compensation, layout.selected, layout.window)
    for _ in range(3 * layout.capacity):
        k_new = _randn(gen, 3, 3, 1, 24, dtype=dtype)
        v_new = _randn(gen, 3, 3, 1, 24, dtype=dtype)
        tk.cache_update(*state, k_new, v_new, *args)
        ops._budgeted_cache_update_ref(*reference, k_new.cpu(), v_new.cpu(), *args)
        for got, want in zip(state, reference, strict=True):
            assert torch.equal(got.cpu(), want)
    assert (state[3][:, 3] > 0).all() == (layout.compensation == 1)  # the rows folded


def test_cache_update_bfloat16_within_tolerance() -> None:
    """bf16: copies exact, the fold within 1e-2. Each step starts from the reference's state:
    the interpreter truncates fp32 -> bf16 (hardware rounds to nearest even), and a truncation
    per fold would drift the running mean one way over many steps."""
    layout = LAYOUTS[0]
    gen = torch.Generator().manual_seed(2)
    reference = [t.cpu() for t in _update_state(gen, layout, torch.bfloat16)]
    args = (layout.sinks, layout.compensation, layout.selected, layout.window)
    for _ in range(3 * layout.capacity):
        k_new = _randn(gen, 3, 3, 1, 24, dtype=torch.bfloat16)
        v_new = _randn(gen, 3, 3, 1, 24, dtype=torch.bfloat16)
        state = [t.to(DEVICE, copy=True) for t in reference]
        tk.cache_update(*state, k_new, v_new, *args)
        ops._budgeted_cache_update_ref(*reference, k_new.cpu(), v_new.cpu(), *args)
        assert torch.equal(state[2].cpu(), reference[2]) and torch.equal(state[3].cpu(),
                                                                          reference[3])
        for got, want in zip(state[:2], reference[:2], strict=True):
            not_folded = torch.ones(want.shape[2], dtype=torch.bool)
            not_folded[layout.sinks] = False
            assert torch.equal(got.cpu()[:, :, not_folded], want[:, :, not_folded])
            torch.testing.assert_close(got.cpu().float(), want.float(), rtol=1e-2, atol=1e-2)


def test_cache_update_writes_one_slot_per_head_and_never_reads_outside_its_row() -> None:
    """Strided views (the runtime passes head slices of k/v): untouched memory stays NaN."""
    layout = LAYOUTS[0]
    gen = torch.Generator().manual_seed(3)
    cap, head_dim = layout.capacity, 24
    k_store = _poisoned((2, 5, cap, head_dim), torch.float32)
    v_store = _poisoned((2, 5, cap, head_dim), torch.float32)
    k_buf, v_buf = k_store[:, 1:4], v_store[:, 1:4]  # heads 1..3 of 5: non-contiguous
    k_buf.copy_(_randn(gen, 2, 3, cap, head_dim))
    v_buf.copy_(_randn(gen, 2, 3, cap, head_dim))
    bias = random_bias(gen, (2, 3, cap)).to(DEVICE)
    counters = torch.tensor([[3, 5, 2, 0], [3, 11, 4, 2]], device=DEVICE)
    new = _randn(gen, 2, 7, 1, head_dim)
    reference = [t.cpu().clone() for t in (k_buf, v_buf, bias, counters)]
    args = (layout.sinks, layout.compensation, layout.selected, layout.window)
    tk.cache_update(k_buf, v_buf, bias, counters, new[:, 2:5], new[:, 4:7], *args)
    ops._budgeted_cache_update_ref(*reference, new[:, 2:5].cpu(), new[:, 4:7].cpu(), *args)
    for got, want in zip((k_buf, v_buf, bias, counters), reference, strict=True):
        assert torch.equal(got.cpu(), want)
    assert torch.isnan(k_store[:, [0, 4]]).all() and torch.isnan(v_store[:, [0, 4]]).all()


# -- compiled for the hardware: what the interpreter cannot show -------------------------------

def test_kernels_compile_for_hopper_with_the_arithmetic_the_tests_assume() -> None:
    """Triton's compiler builds every variant for sm_90 (no GPU needed), without register
    spills; the update's fold keeps the reference's roundings (IEEE division, no FMA, a barrier
    between its reads and writes); decode attention pipelines its K/V loads through shared
    memory (cp.async), in half precision runs its products on tensor cores, and in fp32 runs
    none there (tf32 would round its inputs to 10 mantissa bits): ``compile_kernels.problems``."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tests.compile_kernels"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout)
    assert len(facts) == 12
    assert sum("fp32" in name for name in facts) == 4
    assert compile_kernels.problems(facts) == []


# PTX lines as Triton writes them for sm_90: a tf32 product (what tl.dot makes of fp32 inputs
# unless told "ieee"), a bf16 one, Hopper's warpgroup form, and the fp32 FMA a ieee dot becomes
_TF32 = "\tmma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1, %f2, %f3, %f4}, {%r1}, {%r2};\n"
_BF16 = "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, {%r1}, {%r2};\n"
_WGMMA = "\twgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {%f1}, %rd1, %rd2, p, 1, 1;\n"
_FMA = "\tfma.rn.f32 %f5, %f6, %f7, %f8;\n\twgmma.fence.sync.aligned;\n"
_DECODE = "\tcp.async.cg.shared.global [ %r3 + 0 ], [ %rd4 + 0 ], 0x10, %r5;\n"


def _variant(ptx: str) -> dict:
    return {**compile_kernels.instruction_facts(ptx), "local_bytes": 0}


@pytest.mark.parametrize("products,allowed", [
    (_FMA * 64, True),
    (_FMA + _TF32, False),
    (_FMA + _WGMMA, False),
    (_FMA + _BF16 * 4, False),
])
def test_the_compile_check_refuses_any_tensor_core_product_in_fp32(products: str,
                                                                  allowed: bool) -> None:
    """The rule the compiled check applies, on synthetic PTX: an fp32 decode variant with one
    mma (tf32, bf16 or Hopper's wgmma) is a problem; a bf16 one needs them."""
    facts = {"budgeted decode fp32 d64": _variant(_DECODE + products),
             "budgeted decode bf16 d64": _variant(_DECODE + _BF16)}
    found = compile_kernels.problems(facts)
    assert found == ([] if allowed else [f"budgeted decode fp32 d64: "
                                         f"{facts['budgeted decode fp32 d64']['mma']} tensor-core "
                                         f"products (tf32) in an fp32 variant"])
    without = {"split-K decode bf16 d64": _variant(_DECODE + _FMA)}
    assert compile_kernels.problems(without) == [
        "split-K decode bf16 d64: half-precision products not on tensor cores"]
    assert compile_kernels.instruction_facts(_FMA + _WGMMA)["mma"] == 1  # the fence is no product


# -- the registered implementations: kernels where they apply, the reference elsewhere ----------



def test_registered_attention_runs_the_kernels_for_decode(serving_triton) -> None:
    gen = torch.Generator().manual_seed(11)
    q, k, v = _qkv(gen, 2, 6, 1, 2, 600, 64)  # past SINGLE_PROGRAM_SLOTS: the automatic count splits
    kv_length = torch.tensor([600, 333], device=DEVICE)
    out = kernels.attention_impl(q, k, v, None, kv_length, True, 0, SCALE)
    _assert_matches(out, q, k, v, None, kv_length)
    bias = _budgeted_bias(gen, 2, 2, 40)
    out = kernels.attention_impl(q, k[:, :, :40], v[:, :, :40], bias, None, False, 0, SCALE)
    _assert_matches(out, q, k[:, :, :40], v[:, :, :40], bias, None)
    assert serving_triton["attention"] == 2


@pytest.mark.parametrize("case", ["prefill", "window", "float64"])
def test_registered_attention_falls_back_to_the_reference(serving_triton, case: str) -> None:
    gen = torch.Generator().manual_seed(12)
    t_len, window, dtype = {"prefill": (5, 0, torch.float32), "window": (1, 4, torch.float32),
                            "float64": (1, 0, torch.float64)}[case]
    q, k, v = _qkv(gen, 2, 4, t_len, 2, 9, 16, dtype=dtype)
    kv_length = torch.tensor([9, 6], device=DEVICE)
    out = kernels.attention_impl(q, k, v, None, kv_length, True, window, SCALE)
    want = ops._budgeted_attention_ref(q, k, v, None, kv_length, True, window, SCALE)
    assert torch.equal(out, want) and serving_triton["attention"] == 0


def test_registered_update_runs_the_kernel_and_falls_back_for_float64(serving_triton) -> None:
    layout = LAYOUTS[0]
    args = (layout.sinks, layout.compensation, layout.selected, layout.window)
    for dtype, kernel_calls in ((torch.float32, 1), (torch.float64, 1)):
        gen = torch.Generator().manual_seed(13)
        state = _update_state(gen, layout, dtype)
        if dtype == torch.float64:
            state[2] = state[2].double()
        reference = [t.cpu().clone() for t in state]
        k_new, v_new = _randn(gen, 3, 3, 1, 24, dtype=dtype), _randn(gen, 3, 3, 1, 24, dtype=dtype)
        kernels.cache_update_impl(*state, k_new, v_new, *args)
        ops._budgeted_cache_update_ref(*reference, k_new.cpu(), v_new.cpu(), *args)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(state, reference, strict=True))
        assert serving_triton["update"] == kernel_calls


def test_bad_arguments_are_refused_before_any_kernel(serving_triton) -> None:
    q = torch.randn(1, 3, 1, 8, device=DEVICE)
    k = torch.randn(1, 2, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        kernels.attention_impl(q, k, k, None, None, False, 0, SCALE)
    assert serving_triton["attention"] == 0


# -- enable() ---------------------------------------------------------------------------------

def test_reference_can_be_forced(monkeypatch) -> None:
    monkeypatch.setenv(kernels.KERNELS_ENV, "reference")
    assert kernels.enable() == "reference: KVCOMPILE_KERNELS=reference"
    assert kernels.serving() == "reference: KVCOMPILE_KERNELS=reference"


def test_unknown_kernels_choice_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv(kernels.KERNELS_ENV, "fast")
    with pytest.raises(kernels.KernelsError, match="KVCOMPILE_KERNELS='fast' is not one of"):
        kernels.enable()


@pytest.mark.skipif(CUDA, reason="checks the machine without a GPU")
def test_without_cuda_the_reference_serves(monkeypatch) -> None:
    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    assert kernels.enable() == "reference: no CUDA device"
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    with pytest.raises(kernels.KernelsError, match="no CUDA device"):
        kernels.enable()


# -- on a GPU: the registered ops, CUDA graphs, a whole decode ---------------------------------

gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the kernels compiled)")


@gpu_only
def test_ops_dispatch_to_the_kernels_on_cuda(monkeypatch) -> None:
    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    assert kernels.enable() == "triton"
    gen = torch.Generator().manual_seed(20)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = _qkv(gen, 2, 9, 1, 3, 4000, 64, dtype=dtype)
        kv_length = torch.tensor([4000, 1234], device=DEVICE)
        out = ops.budgeted_attention(q, k, v, None, causal=True, scale=SCALE, kv_length=kv_length)
        _assert_matches(out, q, k, v, None, kv_length)
        bias = _budgeted_bias(gen, 2, 3, 300)
        small_k, small_v = k[:, :, :300].contiguous(), v[:, :, :300].contiguous()
        out = ops.budgeted_attention(q, small_k, small_v, bias, scale=SCALE)
        _assert_matches(out, q, small_k, small_v, bias, None)


@gpu_only
def test_kernels_replay_in_a_cuda_graph(monkeypatch) -> None:
    """Captured once, replayed over steps whose lengths and counters change on the device."""
    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    kernels.enable()
    layout = BudgetLayout(4, 1, 8, 20)
    gen = torch.Generator().manual_seed(21)
    state = _update_state(gen, layout, torch.float32)
    q = _randn(gen, 3, 6, 1, 24)
    full_k, full_v = _randn(gen, 3, 2, 2000, 24), _randn(gen, 3, 2, 2000, 24)
    lengths = torch.tensor([700, 5, 1900], device=DEVICE)
    new = _randn(gen, 3, 3, 1, 24)

    def step():
        ops.budgeted_cache_update(*state, new, new * 0.5, layout)
        lengths.add_(1)
        full = ops.budgeted_attention(q, full_k, full_v, None, causal=True, scale=SCALE,
                                      kv_length=lengths)
        budget = ops.budgeted_attention(q, state[0], state[1], state[2], scale=SCALE)
        return full, budget

    step()  # warm-up: compiles the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    for _ in range(2 * layout.capacity):
        new.copy_(_randn(gen, 3, 3, 1, 24))
        reference = [t.cpu().clone() for t in state]
        ref_lengths = lengths.cpu() + 1
        ops._budgeted_cache_update_ref(*reference, new.cpu(), new.cpu() * 0.5, layout.sinks,
                                       layout.compensation, layout.selected, layout.window)
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a.cpu(), b) for a, b in zip(state, reference, strict=True))
        assert torch.equal(lengths.cpu(), ref_lengths)
        _assert_matches(outputs[0], q, full_k, full_v, None, lengths)
        _assert_matches(outputs[1], q, state[0], state[1], state[2], None)


@gpu_only
def test_engine_decode_on_cuda_matches_the_cpu_reference(monkeypatch) -> None:
    """Prompt + 200 decode steps past capacity: the CUDA engine (kernels, CUDA graphs) against
    the CPU engine (reference), float32."""
    from kvcompile.build.artifact import compile_engine
    from kvcompile.runtime.engine import Engine
    from tests.tiny import tiny_loaded

    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    assert kernels.enable() == "triton"
    loaded = tiny_loaded("llama", seed=3, max_position_embeddings=512)
    arch = loaded.arch
    layout = BudgetLayout(2, 1, 3, 8)
    plan = Plan(tuple(LayerPlan((0,), tuple(range(1, arch.n_kv_heads)), layout)
                      for _ in range(arch.n_layers)))
    _, cpu_engine = compile_engine(loaded, plan, max_context=260)
    gpu_engine = Engine(copy.deepcopy(cpu_engine.model).to(DEVICE), plan, None, max_context=260,
                        eos_token_ids=(0,))
    ids = torch.randint(3, 90, (2, 240), generator=torch.Generator().manual_seed(0))
    outputs = []
    for engine in (cpu_engine, gpu_engine):
        cache = engine.allocate(2, max_context=250)
        logits = [engine.prefill(ids[:, :40], [cache])]
        logits += [engine.extend(ids[:, t:t + 1], cache) for t in range(40, 240)]
        outputs.append(torch.stack(logits).cpu())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)


@gpu_only
def test_loading_an_artifact_on_cuda_enables_the_kernels(tmp_path, monkeypatch) -> None:
    from kvcompile.build.artifact import build_artifact
    from kvcompile.runtime import load
    from tests.test_profile_io import saved_tiny_model

    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    monkeypatch.setattr(kernels, "_status", "reference: enable() has not run")
    _, loaded, profile = saved_tiny_model(tmp_path)
    build_artifact(loaded, profile, tmp_path / "artifact", max_context=96, dtype="bfloat16")
    engine = load(tmp_path / "artifact", device="cuda")
    assert kernels.serving() == "triton"
    assert engine.generate([5, 6, 7, 8], max_new_tokens=4).token_ids
