"""KIVI-layout quantization (runtime/quant.py) against an independent float64 computation.

The oracle works group by group with Python loops in float64 from the module's stated
formula: ``zero = fp16(min)``, ``scale = fp16((max - zero) / (2^b - 1))`` (the range in float32),
codes rounded half to even and clamped, ``x̂ = code * scale + zero``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompile.memory import code_bytes
from kvcompile.runtime.quant import (
    dequantize_keys,
    dequantize_values,
    pack_codes,
    quantize_keys,
    quantize_values,
    unpack_codes,
)

TIE = 1e-5  # (x - zero) / scale this close to k + 1/2: float32 may round it either way


def oracle_group(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Dequantized values of one group (float64 arithmetic, float16 scale and zero), and per
    value the other acceptable result when the code's argument sits on a rounding tie."""
    top = 2 ** bits - 1
    lo, hi = float(values.min()), float(values.max())
    zero = float(np.float16(lo))
    # the module's stated arithmetic: the range in float32, then rounded to float16 (rounding
    # the float64 quotient straight to float16 differs where it sits on a float16 midpoint)
    scale = float(np.float16((np.float32(hi) - np.float32(zero)) / np.float32(top)))
    if scale == 0.0:
        return np.full(values.shape, zero), np.full(values.shape, zero), scale
    arg = (values - zero) / scale
    codes = np.clip(np.round(arg), 0, top)
    tie = np.abs(arg - np.floor(arg) - 0.5) < TIE
    other = np.clip(np.where(codes > arg, codes - 1, codes + 1), 0, top)
    alt = np.where(tie, other, codes)
    return codes * scale + zero, alt * scale + zero, scale


def oracle(x: np.ndarray, bits: int, group: int, per: str) -> tuple[np.ndarray, np.ndarray]:
    """Dequantized ``[B, H, S, D]`` (and tie alternatives): keys per channel over groups of
    ``group`` tokens (``per="channel"``), values per token over groups of channels."""
    out, alt = np.empty_like(x), np.empty_like(x)
    b, h, s, d = x.shape
    for i in range(b):
        for j in range(h):
            if per == "channel":
                spans = [(slice(g0, g0 + group), c) for g0 in range(0, s, group) for c in range(d)]
            else:
                spans = [(t, slice(c0, c0 + group)) for t in range(s) for c0 in range(0, d, group)]
            for index in spans:
                out[(i, j) + index], alt[(i, j) + index], _ = oracle_group(x[(i, j) + index], bits)
    return out, alt


def assert_matches_oracle(got: np.ndarray, want: np.ndarray, alt: np.ndarray, x: np.ndarray) -> None:
    # the module dequantizes in float32: equal to the float64 oracle up to float32 rounding,
    # a code off by one only where the oracle's argument is a rounding tie
    tol = 1e-6 * (1 + np.abs(x))
    ok = (np.abs(got - want) < tol) | (np.abs(got - alt) < tol)
    assert ok.all(), f"{(~ok).sum()} values differ, first at {np.argwhere(~ok)[0]}"


def sample(shape: tuple[int, ...], seed: int, outliers: bool, constant_groups: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if outliers:  # a few channels far larger than the rest, as real keys have
        x[..., 0] *= 40.0
        x[..., -1] += 25.0
    if constant_groups:
        x[:, :, :3] = 0.75
        x[..., :2] = -1.5
    return x


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([8, 4, 2]),
    group=st.integers(2, 9),
    tokens=st.integers(1, 23),
    head_dim=st.integers(1, 13),
    seed=st.integers(0, 2**31 - 1),
    outliers=st.booleans(),
    constant_groups=st.booleans(),
)
def test_quantize_matches_float64_oracle(bits, group, tokens, head_dim, seed, outliers,
                                         constant_groups):
    x = sample((2, 2, tokens, head_dim), seed, outliers, constant_groups)
    xd = x.double().numpy()
    keys = quantize_keys(x, bits, group)
    values = quantize_values(x, bits, group)
    assert keys.codes.dtype == torch.uint8 and keys.codes.shape[-1] == code_bytes(head_dim, bits)
    assert keys.scale.shape == (2, 2, -(-tokens // group), head_dim)
    assert values.scale.shape == (2, 2, tokens, -(-head_dim // group))
    got_k = dequantize_keys(keys, bits, group, head_dim, torch.float64).numpy()
    got_v = dequantize_values(values, bits, group, head_dim, torch.float64).numpy()
    assert_matches_oracle(got_k, *oracle(xd, bits, group, "channel"), xd)
    assert_matches_oracle(got_v, *oracle(xd, bits, group, "token"), xd)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_error_is_at_most_half_a_step_and_constant_groups_are_exact(bits):
    x = sample((1, 3, 40, 7), 3, outliers=True, constant_groups=True)
    group = 8
    keys = quantize_keys(x, bits, group)
    k_hat = dequantize_keys(keys, bits, group, 7)
    step = keys.scale.float().repeat_interleave(group, dim=2)[:, :, :40]
    # half a step, plus the float16 rounding of the zero point and of the scale times the code
    slack = 1e-3 * (x.abs() + 1) + step * 2 ** -10 * (2 ** bits)
    assert bool(((k_hat - x).abs() <= step / 2 + slack).all())
    # constant groups come back exactly (their values are float16 numbers): keys' channels 0
    # and 1 hold -1.5 at every token, value token 5 holds 0.75 in every channel
    assert torch.equal(keys.scale[..., :2], torch.zeros_like(keys.scale[..., :2]))
    assert bool((k_hat[..., :2] == -1.5).all())
    x[:, :, 5] = 0.75
    values = quantize_values(x, bits, group)
    v_hat = dequantize_values(values, bits, group, 7)
    assert bool((v_hat[:, :, 5] == 0.75).all())
    v_step = values.scale.float().repeat_interleave(group, dim=3)[..., :7]
    assert bool(((v_hat - x).abs() <= v_step / 2 + 1e-3 * (x.abs() + 1) + v_step * 2 ** -10 * (2 ** bits)).all())


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("head_dim", [1, 5, 8, 63])
def test_pack_roundtrip_and_layout(bits, head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    codes = torch.randint(0, 2 ** bits, (3, head_dim), generator=gen)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, code_bytes(head_dim, bits))
    assert torch.equal(unpack_codes(packed, bits, head_dim), codes.to(torch.uint8))
    per_byte = 8 // bits
    for j in range(head_dim):  # channel j: byte j // per_byte, bit offset bits * (j % per_byte)
        shift = bits * (j % per_byte)
        assert torch.equal((packed[:, j // per_byte] >> shift) & (2 ** bits - 1), codes[:, j].to(torch.uint8))


def test_bad_bits_and_byte_counts_are_refused():
    with pytest.raises(ValueError, match="bits"):
        quantize_keys(torch.zeros(1, 1, 4, 4), 3, 2)
    with pytest.raises(ValueError, match="take 2 bytes"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.uint8), 4, 4)
