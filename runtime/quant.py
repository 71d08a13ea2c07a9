"""Quantized KV storage: KIVI's layout, in plain torch (the reference every backend matches).

Layout (docs/DESIGN.md, "Quantized storage"), for one head group ``[B, H, S, D]``:

* **keys per channel**: tokens are cut into groups of ``group`` (a last partial group is
  quantized over the tokens it has); each (group, channel) has a ``scale`` and a ``zero``,
  ``[B, H, ceil(S / group), D]``. Keys have outlier channels, so a per-channel range keeps the
  other channels' resolution.
* **values per token**: each token's channels are cut into groups of ``group``; each
  (token, channel group) has a ``scale`` and a ``zero``, ``[B, H, S, ceil(D / group)]``.
* ``code = clamp(round((x - zero) / scale), 0, 2^bits - 1)`` with ``zero = fp16(min)`` and
  ``scale = fp16((max - zero) / (2^bits - 1))`` (0 for a constant group, whose codes are 0),
  all in float32 arithmetic on float32 inputs, then rounded to float16 once;
  ``x̂ = code * scale + zero`` in float32. Scales and zeros are float16 (16 bits each, as KIVI
  stores them); values beyond float16's range are clipped to it.
* codes are ``uint8`` ``[B, H, S, code_bytes]``, ``8 / bits`` per byte: channel ``j`` sits
  in byte ``j // (8 / bits)`` at bit ``bits * (j % (8 / bits))`` (low bits first); a head dim
  that does not fill the last byte pads zero codes.

``round`` is round-half-to-even (torch's, numpy's, onnxruntime's ``Round``), so every backend
rounds the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvcompile.memory import code_bytes, scale_groups

__all__ = [
    "SCALE_DTYPE",
    "Quantized",
    "dequantize_keys",
    "dequantize_values",
    "pack_codes",
    "quantize_keys",
    "quantize_values",
    "unpack_codes",
]

SCALE_DTYPE = torch.float16
_FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass
class Quantized:
    """Codes with their scales and zero points (see the module docstring for the shapes)."""

    codes: Tensor
    scale: Tensor
    zero: Tensor


CODE_BITS = (8, 4, 2)


def levels(bits: int) -> int:
    """The largest code at ``bits``."""
    if bits not in CODE_BITS:
        raise ValueError(f"codes are {CODE_BITS} bits, got {bits}")
    return (1 << bits) - 1


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """``[..., D]`` integer codes below ``2^bits`` -> ``uint8 [..., code_bytes(D, bits)]``."""
    levels(bits)
    codes = codes.to(torch.uint8)
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    pad = -codes.shape[-1] % per_byte
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    packed = codes[..., 0::per_byte].clone()
    for i in range(1, per_byte):
        packed |= codes[..., i::per_byte] << (bits * i)
    return packed


def unpack_codes(packed: Tensor, bits: int, head_dim: int) -> Tensor:
    """The inverse of :func:`pack_codes`: ``uint8 [..., D]``."""
    top = levels(bits)
    if packed.shape[-1] != code_bytes(head_dim, bits):
        raise ValueError(f"{bits}-bit codes of {head_dim} channels take {code_bytes(head_dim, bits)} "
                         f"bytes, got {packed.shape[-1]}")
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    parts = [(packed >> (bits * i)) & top for i in range(per_byte)]
    return torch.stack(parts, dim=-1).flatten(-2)[..., :head_dim]


def _affine(x: Tensor, dim: int, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Codes, fp16 scale and fp16 zero of ``x`` (float32) reduced over ``dim`` (kept)."""
    top = levels(bits)
    x = x.clamp(-_FP16_MAX, _FP16_MAX)
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    zero = lo.to(SCALE_DTYPE)
    scale = ((hi - zero.float()) / top).clamp(max=_FP16_MAX).to(SCALE_DTYPE)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    codes = torch.round((x - zero.float()) / safe).clamp_(0, top)
    return codes, scale, zero


def _quantize_groups(x: Tensor, dim: int, bits: int, group: int) -> Quantized:
    """``x`` with axis ``dim`` cut into groups of ``group`` (a last partial group quantized over
    its own entries): packed codes, and a scale and zero per group in place of that axis."""
    n = x.shape[dim]
    n_groups = scale_groups(n, group)
    x = x.float()
    pad = n_groups * group - n
    if pad:  # repeat the last entry: the partial group's range is its own entries'
        tail = x.narrow(dim, n - 1, 1)
        x = torch.cat([x, tail.expand(*x.shape[:dim], pad, *x.shape[dim + 1:])], dim=dim)
    codes, scale, zero = _affine(x.unflatten(dim, (n_groups, group)), dim + 1, bits)
    codes = codes.flatten(dim, dim + 1).narrow(dim, 0, n)
    return Quantized(pack_codes(codes, bits), scale.squeeze(dim + 1), zero.squeeze(dim + 1))


def quantize_keys(k: Tensor, bits: int, group: int) -> Quantized:
    """Keys ``[B, H, S, D]`` per channel over groups of ``group`` tokens."""
    return _quantize_groups(k, 2, bits, group)


def quantize_values(v: Tensor, bits: int, group: int) -> Quantized:
    """Values ``[B, H, S, D]`` per token over groups of ``group`` channels."""
    return _quantize_groups(v, 3, bits, group)


def dequantize_keys(q: Quantized, bits: int, group: int, head_dim: int,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """``[B, H, S, D]`` in ``dtype`` (computed in float32) from :func:`quantize_keys`' output."""
    codes = unpack_codes(q.codes, bits, head_dim).float()
    s = codes.shape[2]
    scale = q.scale.float().repeat_interleave(group, dim=2)[:, :, :s]
    zero = q.zero.float().repeat_interleave(group, dim=2)[:, :, :s]
    return (codes * scale + zero).to(dtype)


def dequantize_values(q: Quantized, bits: int, group: int, head_dim: int,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """``[B, H, S, D]`` in ``dtype`` (computed in float32) from :func:`quantize_values`' output."""
    codes = unpack_codes(q.codes, bits, head_dim).float()
    scale = q.scale.float().repeat_interleave(group, dim=3)[..., :head_dim]
    zero = q.zero.float().repeat_interleave(group, dim=3)[..., :head_dim]
    return (codes * scale + zero).to(dtype)
