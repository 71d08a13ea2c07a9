"""The quantized cache's Triton kernels against the plain-torch references of its two ops.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests.triton_mode`` before the kernels are imported) on CPU tensors; with one, compiled.
Inputs are random, with outlier key channels; everything a kernel must not read (code slots
past a row's ``q_length``, full-precision slots past ``fp_length``, scales of groups past the
codes) holds NaN or random bytes, and outputs and split workspaces are NaN before each run.
Shapes are small (the interpreter runs one numpy program per grid cell) with a head dim that is
not a power of two and value groups of which the last is partial.

Tolerances. Attention: against a float64 recomputation on the same dequantized values (codes
dequantized in float32 and rounded to the full-precision part's dtype, as the op specifies),
fp32 1e-5, fp16/bf16 1e-2 (``tests.triton_mode.TOLERANCE``: the kernel's products are fp32, or
tf32 with the probabilities rounded to 10 bits in half precision). Append: bit for bit, every
buffer after every step (codes, fp16 scales and zeros, ring, lengths): the kernel does the
reference's float32 operations in the same order with IEEE rounding.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.triton_mode import CUDA, DEVICE, TOLERANCE  # before the kernels: sets the mode

# isort: split
from kvcompile.plan import Storage
from kvcompile.runtime import kernels, quant_ops
from kvcompile.runtime import triton_quant as tq
from kvcompile.runtime.quant import (
    Quantized,
    dequantize_keys,
    dequantize_values,
    quantize_keys,
    quantize_values,
)
from kvcompile.runtime.quant_cache import empty_codes
from tests import compile_kernels
from tests.test_ops import random_bias

ROOT = Path(__file__).resolve().parents[1]
SCALE = 0.2
BITS = [(8, 8), (4, 4), (4, 2), (2, 2)]
QGROUP = 16  # quantization group: tokens per key group, channels per value group
HEAD_DIM = 40  # 64 lanes, 24 masked; value groups of 16, 16 and 8 channels


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def _keys_like_a_model(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Random keys with two outlier channels (the reason keys are quantized per channel)."""
    k = torch.randn(*shape, generator=gen)
    k[..., 3] *= 20.0
    k[..., 17] += 8.0
    return k


def _codes(gen: torch.Generator, batch: int, heads: int, slots: int, q_length: list[int],
           key_bits: int, value_bits: int) -> tuple[Quantized, Quantized]:
    """Codes of random keys and values ``[B, H, slots, D]`` by the reference quantizer, with
    everything past each row's ``q_length`` replaced by junk (random bytes, NaN scales)."""
    keys = quantize_keys(_keys_like_a_model(gen, batch, heads, slots, HEAD_DIM), key_bits,
                         QGROUP)
    values = quantize_values(torch.randn(batch, heads, slots, HEAD_DIM, generator=gen),
                             value_bits, QGROUP)
    for row, n in enumerate(q_length):
        for q in (keys, values):
            q.codes[row, :, n:] = torch.randint(0, 256, q.codes[row, :, n:].shape,
                                                generator=gen, dtype=torch.uint8)
        values.scale[row, :, n:] = float("nan")
        values.zero[row, :, n:] = float("nan")
        first_unused = -(-n // QGROUP)  # key groups holding no token of the row
        keys.scale[row, :, first_unused:] = float("nan")
        keys.zero[row, :, first_unused:] = float("nan")
    return (Quantized(*(t.to(DEVICE) for t in (keys.codes, keys.scale, keys.zero))),
            Quantized(*(t.to(DEVICE) for t in (values.codes, values.scale, values.zero))))


def _as_the_kernel_rounds(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float32 ``x`` rounded to ``dtype`` as float64: to nearest even, as the op and compiled
    kernels round, except bfloat16 in the interpreter, which truncates (numpy has no bfloat16;
    ``tests/test_kernels.py`` meets the same): there the oracle truncates too, so the
    tolerance still measures the kernel's arithmetic and not the interpreter's conversion."""
    if dtype == torch.bfloat16 and not CUDA:
        return (x.view(torch.int32) & -65536).view(torch.float32).double()
    return x.to(dtype).double()


def _oracle(q, keys: Quantized, values: Quantized, q_length, k_fp, v_fp, fp_bias, fp_length,
            key_bits: int, value_bits: int) -> torch.Tensor:
    """Float64 attention over the dequantized codes (rounded to ``k_fp``'s dtype) and the
    full-precision part, masked slot by slot: an independent recomputation of the op."""
    cpu = [t.cpu() for t in (q, keys.codes, keys.scale, keys.zero, values.codes, values.scale,
                             values.zero, q_length, k_fp, v_fp)]
    q, kc, ks, kz, vc, vs, vz, q_length, k_fp, v_fp = cpu
    b, hq, _, d = q.shape
    hkv = k_fp.shape[1]
    k_q = _as_the_kernel_rounds(dequantize_keys(Quantized(kc, ks, kz), key_bits, QGROUP, d),
                                k_fp.dtype)
    v_q = _as_the_kernel_rounds(dequantize_values(Quantized(vc, vs, vz), value_bits, QGROUP, d),
                                k_fp.dtype)
    out = torch.zeros(b, hq, 1, d, dtype=torch.float64)
    for row in range(b):
        for head in range(hq):
            kv = head // (hq // hkv)
            n_q = int(q_length[row])
            if fp_bias is not None:
                bias = fp_bias[row, kv].cpu().double()
            else:
                bias = torch.full((k_fp.shape[2],), float("-inf"), dtype=torch.float64)
                bias[:int(fp_length[row])] = 0.0
            keep = bias > float("-inf")
            k = torch.cat([k_q[row, kv, :n_q], k_fp[row, kv][keep].double()])
            v = torch.cat([v_q[row, kv, :n_q], v_fp[row, kv][keep].double()])
            if k.shape[0] == 0:
                continue  # nothing visible: the op's output is 0
            logits = k @ q[row, head, 0].double() * SCALE
            logits = logits + torch.cat([torch.zeros(n_q, dtype=torch.float64), bias[keep]])
            out[row, head, 0] = torch.softmax(logits, 0) @ v
    return out


def _assert_close(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.cpu().double(), want, rtol=tol, atol=tol)


# -- decode attention: full heads (codes + residual ring masked by fp_length) ------------------

Q_LENGTHS = [0, 32, 64, 80, 96]  # none, group and split boundaries, mid-split, the whole body
FP_LENGTHS = [5, 0, 15, 1, 0]  # row 1: ring empty; row 4 (96 codes) ends on a split boundary


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"k{b[0]}v{b[1]}")
@pytest.mark.parametrize("splits", [1, 3], ids=["one-program", "split-K"])
def test_full_head_decode_matches_the_oracle(bits: tuple[int, int], splits: int) -> None:
    """Rows at 0 codes, on group boundaries and a full body, their rings at 0..15 tokens; 96
    code slots in 3 splits of 32 (block 16). GQA: 2 KV heads of 3 query heads each."""
    key_bits, value_bits = bits
    gen = torch.Generator().manual_seed(key_bits * 10 + value_bits + splits)
    batch, kv_heads, group = len(Q_LENGTHS), 2, 3
    keys, values = _codes(gen, batch, kv_heads, 96, Q_LENGTHS, key_bits, value_bits)
    q = _randn(gen, batch, kv_heads * group, 1, HEAD_DIM)
    k_fp, v_fp = (_randn(gen, batch, kv_heads, QGROUP, HEAD_DIM) for _ in range(2))
    q_length = torch.tensor(Q_LENGTHS, device=DEVICE)
    fp_length = torch.tensor(FP_LENGTHS, device=DEVICE)
    for row, n in enumerate(FP_LENGTHS):
        k_fp[row, :, n:] = float("nan")
        v_fp[row, :, n:] = float("nan")
    out = torch.full(q.shape, float("nan"), device=DEVICE)
    partials = tuple(t.fill_(float("nan")) for t in
                     tq.split_workspace(batch * kv_heads, splits, group, HEAD_DIM, DEVICE))
    tq.quantized_decode_attention(q, keys, values, q_length, k_fp, v_fp, None, fp_length,
                                  key_bits, value_bits, QGROUP, SCALE, num_splits=splits,
                                  block_n=16, out=out, partials=partials)
    want = _oracle(q, keys, values, q_length, k_fp, v_fp, None, fp_length, key_bits, value_bits)
    _assert_close(out, want, torch.float32)
    assert not torch.isnan(out).any()


def test_a_row_with_nothing_visible_gives_zeros() -> None:
    gen = torch.Generator().manual_seed(1)
    keys, values = _codes(gen, 2, 1, 32, [0, 20], 4, 4)
    q = _randn(gen, 2, 2, 1, HEAD_DIM)
    k_fp, v_fp = (_randn(gen, 2, 1, QGROUP, HEAD_DIM) for _ in range(2))
    out = tq.quantized_decode_attention(q, keys, values, torch.tensor([0, 20], device=DEVICE),
                                        k_fp, v_fp, None, torch.tensor([0, 3], device=DEVICE),
                                        4, 4, QGROUP, SCALE, num_splits=1, block_n=16)
    assert torch.equal(out[0].cpu(), torch.zeros(2, 1, HEAD_DIM))
    want = _oracle(q, keys, values, torch.tensor([0, 20]), k_fp, v_fp, None,
                   torch.tensor([0, 3]), 4, 4)
    _assert_close(out, want, torch.float32)


# -- decode attention: budgeted heads (selected slots as codes + fp part masked by fp_bias) ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [(8, 8), (4, 2)], ids=lambda b: f"k{b[0]}v{b[1]}")
def test_budgeted_decode_with_fp_bias_matches_the_oracle(dtype: torch.dtype,
                                                         bits: tuple[int, int]) -> None:
    """37 selected slots (the last key group partial) filled to 37, 21 and 0; the
    full-precision part's bias holds 0, ``ln n`` (one large count) and ``-inf``; the last row
    sees nothing at all. Tiles of 32 slots span two key groups: each slot's key scale is
    gathered (the full-head tests' tiles of 16 lie in one group and load one scale row)."""
    key_bits, value_bits = bits
    gen = torch.Generator().manual_seed(key_bits + value_bits + len(str(dtype)))
    batch, kv_heads, group, n_fp = 3, 2, 4, 11
    keys, values = _codes(gen, batch, kv_heads, 37, [37, 21, 0], key_bits, value_bits)
    q = _randn(gen, batch, kv_heads * group, 1, HEAD_DIM, dtype=dtype)
    k_fp, v_fp = (_randn(gen, batch, kv_heads, n_fp, HEAD_DIM, dtype=dtype) for _ in range(2))
    fp_bias = random_bias(gen, (batch, kv_heads, n_fp))
    fp_bias[0, :, 2] = torch.log(torch.tensor(3000.0))
    fp_bias[2] = float("-inf")
    fp_bias = fp_bias.to(DEVICE)
    q_length = torch.tensor([37, 21, 0], device=DEVICE)
    out = tq.quantized_decode_attention(q, keys, values, q_length, k_fp, v_fp, fp_bias, None,
                                        key_bits, value_bits, QGROUP, SCALE, block_n=32)
    want = _oracle(q, keys, values, q_length, k_fp, v_fp, fp_bias, None, key_bits, value_bits)
    _assert_close(out, want, dtype)
    assert torch.equal(out[2].float().cpu(), torch.zeros(kv_heads * group, 1, HEAD_DIM))


def test_dequantized_keys_are_rounded_to_the_fp_dtype() -> None:
    """fp16: the codes' values are rounded to fp16 before the product, as the op specifies.
    Values picked so that the rounding moves the softmax by far more than the tolerance."""
    gen = torch.Generator().manual_seed(4)
    k = torch.zeros(1, 1, QGROUP, HEAD_DIM)
    k[0, 0, :, 0] = torch.linspace(1000.0, 1003.0, QGROUP)  # fp16 spacing 0.5, scale ~0.012
    keys = quantize_keys(k, 8, QGROUP)
    values = quantize_values(torch.randn(1, 1, QGROUP, HEAD_DIM, generator=gen), 8, QGROUP)
    keys, values = (Quantized(*(t.to(DEVICE) for t in (x.codes, x.scale, x.zero)))
                    for x in (keys, values))
    q = torch.zeros(1, 1, 1, HEAD_DIM, dtype=torch.float16, device=DEVICE)
    q[..., 0] = 1.0 / SCALE  # logits = the keys' channel 0
    k_fp = torch.zeros(1, 1, 1, HEAD_DIM, dtype=torch.float16, device=DEVICE)
    length = torch.tensor([QGROUP], device=DEVICE)
    out = tq.quantized_decode_attention(q, keys, values, length, k_fp, k_fp, None,
                                        torch.tensor([0], device=DEVICE), 8, 8, QGROUP, SCALE)
    want = _oracle(q, keys, values, length, k_fp, k_fp, None, torch.tensor([0]), 8, 8)
    _assert_close(out, want, torch.float16)


# -- the append: bit for bit -------------------------------------------------------------------

def _append_state(gen: torch.Generator, lengths: list[int], n_groups: int, storage: Storage,
                  dtype: torch.dtype) -> list[torch.Tensor]:
    """Body codes + ring of a quantized full group, rows at ``lengths`` (random contents)."""
    batch, heads = len(lengths), 2
    keys, values = empty_codes(batch, heads, n_groups * QGROUP, n_groups, HEAD_DIM, storage,
                               "cpu")
    for t in (keys.codes, values.codes):
        t.copy_(torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8))
    for t in (keys.scale, keys.zero, values.scale, values.zero):
        t.copy_(torch.randn(t.shape, generator=gen))
    rings = [_keys_like_a_model(gen, batch, heads, QGROUP, HEAD_DIM).to(dtype),
             torch.randn(batch, heads, QGROUP, HEAD_DIM, generator=gen).to(dtype)]
    state = [keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero, *rings,
             torch.tensor(lengths)]
    return [t.to(DEVICE) for t in state]


def _new_token(gen: torch.Generator, batch: int, step: int, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token's keys and values: outliers; every 7th step a constant key channel 5 across a
    group and a value channel beyond fp16's range (both clipped); occasional exact ties."""
    k = _keys_like_a_model(gen, batch, 2, 1, HEAD_DIM)
    v = torch.randn(batch, 2, 1, HEAD_DIM, generator=gen)
    k[..., 5] = 0.75
    if step % 7 == 0:
        v[..., 9] = 1e5
        k[..., 11] = -7e4
    v[..., 20:24] = torch.round(v[..., 20:24] * 2) / 2  # exact halves: ties in the rounding
    return k.to(dtype=dtype, device=DEVICE), v.to(dtype=dtype, device=DEVICE)


APPEND_CASES = [(bits, torch.float32) for bits in BITS] + [((4, 2), torch.float16),
                                                            ((2, 2), torch.bfloat16)]


@pytest.mark.parametrize("bits,dtype", APPEND_CASES,
                         ids=lambda c: str(c).removeprefix("torch.") if isinstance(
                             c, torch.dtype) else f"k{c[0]}v{c[1]}")
def test_append_is_bit_identical_to_the_reference(bits: tuple[int, int],
                                                  dtype: torch.dtype) -> None:
    """2 groups + 3 steps from rows at 0, one before a flush, mid-group and at the body's
    capacity (their flushes overwrite the last group, as the reference does); every tensor
    equal bit for bit after every step."""
    key_bits, value_bits = bits
    storage = Storage(key_bits, value_bits, QGROUP)
    gen = torch.Generator().manual_seed(key_bits * 3 + value_bits)
    n_groups = 3
    state = _append_state(gen, [0, QGROUP - 1, 2 * QGROUP + 6, n_groups * QGROUP], n_groups,
                          storage, dtype)
    reference = [t.cpu().clone() for t in state]
    flushed = 0
    for step in range(2 * QGROUP + 3):
        k_new, v_new = _new_token(gen, 4, step, dtype)
        flushed += int((state[8] % QGROUP == QGROUP - 1).sum())
        tq.quantized_append(Quantized(*state[:3]), Quantized(*state[3:6]), *state[6:], k_new,
                            v_new, key_bits, value_bits, QGROUP)
        quant_ops._quantized_append_ref(*reference, k_new.cpu(), v_new.cpu(), key_bits,
                                        value_bits, QGROUP)
        for index, (got, want) in enumerate(zip(state, reference, strict=True)):
            assert torch.equal(got.cpu(), want), f"step {step}, tensor {index}"
    assert flushed == 2 + 3 + 2 + 2  # the row one token short of a flush flushes 3 times


def test_append_writes_only_its_row_and_slots() -> None:
    """Head slices of larger buffers (strided views) and a NaN body: only the ring slot, and on
    a flush the target group's codes and scales, change."""
    storage = Storage(4, 2, QGROUP)
    gen = torch.Generator().manual_seed(8)
    state = _append_state(gen, [QGROUP - 1, 5], 2, storage, torch.float32)
    wide = [torch.cat([t, t[:, :1]], dim=1) for t in state[:8]]  # 3 heads; use heads 0..1
    for t in wide[1:3] + wide[4:6]:
        t[:, 2] = float("nan")
    views = [t[:, :2] for t in wide] + [state[8]]
    reference = [t.cpu().clone() for t in state]
    reference[:8] = [t[:, :2].cpu().clone() for t in wide]
    k_new, v_new = _new_token(gen, 2, 1, torch.float32)
    tq.quantized_append(Quantized(*views[:3]), Quantized(*views[3:6]), *views[6:], k_new, v_new,
                        4, 2, QGROUP)
    quant_ops._quantized_append_ref(*reference, k_new.cpu(), v_new.cpu(), 4, 2, QGROUP)
    for got, want in zip(views, reference, strict=True):
        assert torch.equal(got.cpu(), want)
    assert all(torch.isnan(t[:, 2]).all() for t in wide[1:3] + wide[4:6])


# -- the registered implementations ------------------------------------------------------------

def test_registered_ops_run_the_kernels(serving_triton) -> None:
    gen = torch.Generator().manual_seed(9)
    keys, values = _codes(gen, 2, 1, 32, [32, 16], 4, 4)
    q = _randn(gen, 2, 2, 1, HEAD_DIM)
    k_fp, v_fp = (_randn(gen, 2, 1, QGROUP, HEAD_DIM) for _ in range(2))
    q_length, fp_length = torch.tensor([32, 16], device=DEVICE), torch.tensor([3, 9], device=DEVICE)
    args = (q, keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero,
            q_length, k_fp, v_fp, None, fp_length, 4, 4, QGROUP, SCALE)
    out = kernels.quantized_attention_impl(*args)
    _assert_close(out, _oracle(q, keys, values, q_length, k_fp, v_fp, None, fp_length, 4, 4),
                  torch.float32)
    state = _append_state(gen, [QGROUP - 1, 3], 2, Storage(4, 4, QGROUP), torch.float32)
    reference = [t.cpu().clone() for t in state]
    k_new, v_new = _new_token(gen, 2, 0, torch.float32)
    kernels.quantized_append_impl(*state, k_new, v_new, 4, 4, QGROUP)
    quant_ops._quantized_append_ref(*reference, k_new.cpu(), v_new.cpu(), 4, 4, QGROUP)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(state, reference, strict=True))
    assert serving_triton["quantized attention"] == 1 and serving_triton["quantized append"] == 1


def test_registered_ops_fall_back_to_the_reference(serving_triton) -> None:
    """float64, no code slots, a group that is not a power of two (append), and bad arguments
    (the reference's error, raised without any kernel)."""
    gen = torch.Generator().manual_seed(10)
    keys, values = _codes(gen, 1, 1, 32, [32], 8, 8)
    q = torch.randn(1, 1, 1, HEAD_DIM, dtype=torch.float64, generator=gen).to(DEVICE)
    k_fp = torch.randn(1, 1, 4, HEAD_DIM, dtype=torch.float64, generator=gen).to(DEVICE)
    args = [q, keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero,
            torch.tensor([32], device=DEVICE), k_fp, k_fp, None, torch.tensor([2], device=DEVICE),
            8, 8, QGROUP, SCALE]
    assert torch.equal(kernels.quantized_attention_impl(*args),
                       quant_ops._quantized_attention_ref(*args))
    empty = [t[:, :, :0] for t in args[1:7]]  # no code slots (max_context below a group)
    args32 = [args[0].float(), *empty, torch.tensor([0], device=DEVICE), k_fp.float(),
              k_fp.float(), *args[10:]]
    assert torch.equal(kernels.quantized_attention_impl(*args32),
                       quant_ops._quantized_attention_ref(*args32))
    args[0] = q.float().expand(1, 1, 2, HEAD_DIM)
    args[8] = args[9] = k_fp.float()
    with pytest.raises(ValueError, match="decode op"):
        kernels.quantized_attention_impl(*args)
    group = 12
    storage = Storage(8, 8, group)
    keys, values = empty_codes(1, 1, 2 * group, 2, HEAD_DIM, storage, DEVICE)
    ring = [torch.zeros(1, 1, group, HEAD_DIM, device=DEVICE) for _ in range(2)]
    state = [keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero, *ring,
             torch.tensor([group - 1], device=DEVICE)]
    reference = [t.cpu().clone() for t in state]
    k_new, v_new = _new_token(gen, 1, 0, torch.float32)
    kernels.quantized_append_impl(*state, k_new[:, :1], v_new[:, :1], 8, 8, group)
    quant_ops._quantized_append_ref(*reference, k_new[:, :1].cpu(), v_new[:, :1].cpu(), 8, 8,
                                    group)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(state, reference, strict=True))
    assert serving_triton["quantized attention"] == 0 and serving_triton["quantized append"] == 0


# -- compiled for the hardware -----------------------------------------------------------------

def test_quantized_kernels_compile_for_hopper() -> None:
    """Triton's compiler builds every quantized variant for sm_90 without register spills; the
    append has IEEE division and no FMA (its codes are bit-exact only so); half-precision
    attention runs its products on tensor cores, fp32 none (``compile_kernels.problems``)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tests.compile_kernels", "--quantized"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout)
    assert len(facts) == 9 and sum(name.startswith("quantized append") for name in facts) == 3
    assert compile_kernels.problems(facts) == []


# -- on a GPU: the ops through the dispatcher, a whole quantized buffer --------------------------

@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the kernels compiled)")
def test_quantized_buffer_on_cuda_matches_the_cpu_reference(monkeypatch) -> None:
    """A quantized full buffer filled with a prompt, then 40 tokens appended one by one and
    attended at every step: CUDA (kernels through the registered ops) against CPU (reference),
    bit for bit in the buffers, within tolerance in the outputs."""
    from kvcompile.runtime.quant_cache import QuantizedFullBuffer

    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    assert kernels.enable() == "triton"
    storage = Storage(4, 2, 32)
    gen = torch.Generator().manual_seed(11)
    buffers = [QuantizedFullBuffer.empty(2, 2, 200, 64, storage, device=device)
               for device in ("cpu", DEVICE)]
    prompt = [torch.randn(2, 2, 70, 64, generator=gen) for _ in range(2)]
    for buf in buffers:
        buf.fill(*(t.to(buf.k_res.device) for t in prompt))
    for _ in range(40):
        k_new, v_new, q = (torch.randn(2, 2 * (1 + (i == 2)), 1, 64, generator=gen)
                           for i in range(3))
        outs = []
        for buf in buffers:
            dev = buf.k_res.device
            buf.write(k_new.to(dev), v_new.to(dev))
            outs.append(buf.attend(q.to(dev), scale=SCALE).cpu())
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(buffers[0].__dict__.values(), buffers[1].__dict__.values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b.cpu())
        elif isinstance(a, Quantized):
            assert all(torch.equal(x, y.cpu()) for x, y in ((a.codes, b.codes),
                                                            (a.scale, b.scale), (a.zero, b.zero)))
