"""Which implementation serves the ``kvcompile`` ops on CUDA: the Triton kernels or the reference.

:func:`enable` registers the Triton kernels (:mod:`kvcompile.runtime.triton_kernels`) as the
CUDA implementations of ``kvcompile::budgeted_attention``,
``kvcompile::budgeted_cache_update`` and the quantized cache's ``kvcompile::quantized_attention``
and ``kvcompile::quantized_append`` (:mod:`kvcompile.runtime.triton_quant`), once per process,
and says which implementation serves.
The registered functions hand every call the kernels do not cover (prefill with ``T > 1``, a
sliding window, float64, ...) to the plain-torch reference, so registering never changes what
the ops compute, only how. ``KVCOMPILE_KERNELS=reference`` keeps (or puts back) the reference,
for debugging; ``KVCOMPILE_KERNELS=triton`` makes a missing GPU or Triton an error instead of a
silent fallback. CPU never dispatches here: the registration is for the CUDA key only.
"""
from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

from kvcompile.errors import KVCompileError
from kvcompile.runtime import ops, quant_ops
from kvcompile.runtime.quant import Quantized

__all__ = ["KERNELS_ENV", "KernelsError", "enable", "serving"]

KERNELS_ENV = "KVCOMPILE_KERNELS"
CHOICES = ("auto", "triton", "reference")
MIN_CAPABILITY = (8, 0)  # tf32 tl.dot (the fp16/bf16 products) needs Ampere or newer

_triton: ModuleType | None = None  # the kernels module, once imported on a CUDA machine
_triton_quant: ModuleType | None = None  # the quantized cache's kernels, imported with it
_registered = False
_status = "reference: enable() has not run"


class KernelsError(KVCompileError):
    """``KVCOMPILE_KERNELS`` asks for something this machine cannot do."""


def serving() -> str:
    """The last :func:`enable` result, e.g. ``"triton"`` or ``"reference: no CUDA device"``."""
    return _status


def enable() -> str:
    """Register the Triton kernels for CUDA if they can serve here; return who serves.

    ``"triton"``, or ``"reference: <why>"``. Safe to call any number of times: the kernels
    are registered once, and each call re-reads ``KVCOMPILE_KERNELS``.
    """
    global _status
    choice = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise KernelsError(f"{KERNELS_ENV}={choice!r} is not one of {', '.join(CHOICES)}; "
                           f"unset it or pick one")
    reason = f"{KERNELS_ENV}=reference" if choice == "reference" else _unavailable()
    if reason is None:
        _register()
        _status = "triton"
    else:
        if choice == "triton":
            raise KernelsError(f"{KERNELS_ENV}=triton, but {reason}; unset it to serve with "
                               f"the reference")
        _status = f"reference: {reason}"
    return _status


def _unavailable() -> str | None:
    """Why the Triton kernels cannot serve on this machine, or None."""
    global _triton, _triton_quant
    if not torch.cuda.is_available():
        return "no CUDA device"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return (f"the GPU's compute capability {capability[0]}.{capability[1]} is below "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}")
    if _triton is None:
        try:
            from kvcompile.runtime import triton_kernels, triton_quant
        except ImportError as exc:
            return f"Triton is not importable ({exc})"
        _triton, _triton_quant = triton_kernels, triton_quant
    return None


def _register() -> None:
    global _registered
    if _registered:
        return
    torch.library.register_kernel("kvcompile::budgeted_attention", "cuda", attention_impl)
    torch.library.register_kernel("kvcompile::budgeted_cache_update", "cuda", cache_update_impl)
    torch.library.register_kernel("kvcompile::quantized_attention", "cuda",
                                  quantized_attention_impl)
    torch.library.register_kernel("kvcompile::quantized_append", "cuda", quantized_append_impl)
    _registered = True


def attention_impl(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                   kv_length: Tensor | None, causal: bool, window: int, scale: float) -> Tensor:
    """The op's CUDA implementation: the kernels for decode shapes, else the reference."""
    ops._check_attention_args(q, k, v, bias, kv_length, causal, window)
    if (_status != "triton" or _triton is None
            or _triton.unsupported_attention(q, k, v, bias, kv_length, causal, window)):
        return ops._budgeted_attention_ref(q, k, v, bias, kv_length, causal, window, scale)
    # T == 1 and no window: causal or not, the query sees every slot below its row's length
    return _triton.decode_attention(q, k, v, bias, kv_length, scale)


def cache_update_impl(k_buf: Tensor, v_buf: Tensor, bias: Tensor, counters: Tensor,
                      k_new: Tensor, v_new: Tensor, sinks: int, compensation: int, selected: int,
                      window: int) -> None:
    """The op's CUDA implementation: one kernel launch, or the reference where not covered."""
    ops._check_update_args(k_buf, v_buf, bias, counters, k_new, v_new,
                           sinks + compensation + selected + window, window)
    if (_status != "triton" or _triton is None
            or _triton.unsupported_update(k_buf, v_buf, bias, k_new, v_new)):
        ops._budgeted_cache_update_ref(k_buf, v_buf, bias, counters, k_new, v_new,
                                       sinks, compensation, selected, window)
        return
    _triton.cache_update(k_buf, v_buf, bias, counters, k_new, v_new,
                         sinks, compensation, selected, window)


def quantized_attention_impl(q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor,
                             v_codes: Tensor, v_scale: Tensor, v_zero: Tensor,
                             q_length: Tensor, k_fp: Tensor, v_fp: Tensor,
                             fp_bias: Tensor | None, fp_length: Tensor | None, key_bits: int,
                             value_bits: int, group: int, scale: float) -> Tensor:
    """``quantized_attention``'s CUDA implementation: the kernel, or the reference for what it
    does not cover (which also raises the reference's errors on bad arguments)."""
    keys, values = Quantized(k_codes, k_scale, k_zero), Quantized(v_codes, v_scale, v_zero)
    if (_status == "triton" and _triton_quant is not None
            and not _triton_quant.unsupported_quantized_attention(
                q, keys, values, q_length, k_fp, v_fp, fp_bias, fp_length, key_bits,
                value_bits, group)):
        return _triton_quant.quantized_decode_attention(
            q, keys, values, q_length, k_fp, v_fp, fp_bias, fp_length, key_bits, value_bits,
            group, scale)
    return quant_ops._quantized_attention_ref(q, k_codes, k_scale, k_zero, v_codes, v_scale,
                                              v_zero, q_length, k_fp, v_fp, fp_bias, fp_length,
                                              key_bits, value_bits, group, scale)


def quantized_append_impl(k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, v_codes: Tensor,
                          v_scale: Tensor, v_zero: Tensor, k_res: Tensor, v_res: Tensor,
                          length: Tensor, k_new: Tensor, v_new: Tensor, key_bits: int,
                          value_bits: int, group: int) -> None:
    """``quantized_append``'s CUDA implementation: one kernel launch, or the reference."""
    keys, values = Quantized(k_codes, k_scale, k_zero), Quantized(v_codes, v_scale, v_zero)
    if (_status == "triton" and _triton_quant is not None
            and not _triton_quant.unsupported_quantized_append(
                keys, values, k_res, v_res, length, k_new, v_new, key_bits, value_bits, group)):
        _triton_quant.quantized_append(keys, values, k_res, v_res, length, k_new, v_new,
                                       key_bits, value_bits, group)
        return
    quant_ops._quantized_append_ref(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res,
                                    v_res, length, k_new, v_new, key_bits, value_bits, group)
