"""The two ``kvcompile`` custom ops: budgeted attention and the budgeted cache update.

Both are registered with ``torch.library.custom_op`` so that graphs (export, ONNX, compile)
see one opaque node per operation, with a fake (meta) implementation for shape propagation.
The implementations here are the plain-torch references: they run on any device and dtype
and define the semantics the Triton kernels and the ONNX function bodies must reproduce
(docs/DESIGN.md, "Static-budget cache semantics"). On a device they read nothing back to the host
(static shapes: a full head's buffer is attended by its valid length ``kv_length``, a
budgeted one by its per-slot bias). On CPU, where such reads are free, they take shortcuts
(``CPU_SHORTCUTS``): a half-filled buffer is trimmed to its length, and the cache update
takes a bit-identical scalar path when every batch row is in the same state. In plain eager
CPU mode the public wrappers also skip the dispatcher (see ``_plain_eager_cpu``); anything
that traces or compiles still sees the registered ops.

Conventions shared with :mod:`kvcompile.runtime.cache`:

* ``bias`` is an additive logit bias per KV slot, ``[B, Hkv, S]``: ``0`` occupied, ``ln n``
  for the compensation slot standing for ``n`` evicted tokens, ``-inf`` empty. The cache keeps
  it in **float32** for float32/half/bf16 buffers (``ln n`` must not be rounded to bf16) and in
  float64 for float64 buffers; both ops accept any floating bias dtype.
* ``kv_length`` (int64 ``[B]``) is the number of filled slots of each row of a preallocated
  buffer; slots past it are not keys.
* Softmax is computed in float32 (float64 stays float64) and the output has the query dtype.
  The plain-torch decode path (``T == 1``) takes the scores from a matmul in the input dtype
  (rounded to it, accumulated in float32 by the backend) before upcasting them; the chunked
  path and the Triton kernels keep the scores in float32 throughout.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcompile.plan import BudgetLayout

__all__ = ["budgeted_attention", "budgeted_cache_update", "QUERY_CHUNK"]

QUERY_CHUNK = 1024
"""Queries per chunk on the masked (sliding-window / biased) path: bounds the score tensor to
``B * Hq * QUERY_CHUNK * keys`` floats instead of ``T * S`` per head."""

_MAX_SCORES = 1 << 25
"""Cap on score elements per chunk (128 MiB in float32); the chunk shrinks below QUERY_CHUNK
when batch x heads x keys is large."""

_HAS_ENABLE_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")

CPU_SHORTCUTS = True
"""On CPU, reading lengths and counters back is free, so the implementations may branch on
them (trim a half-filled buffer, take the slice-copy update): same results, less work. Off,
CPU runs the device path (static shapes, no host reads), which tests compare against."""


def host_reads_free(tensor: Tensor) -> bool:
    """Whether code may read ``tensor``'s values on the host to take a CPU shortcut."""
    return CPU_SHORTCUTS and tensor.device.type == "cpu"


def _plain_eager_cpu(*tensors: Tensor | None) -> bool:
    """True when calling an op's implementation directly cannot differ from dispatching the op.

    The public wrappers below go through the registered ``torch.library`` op whenever anything
    might observe it: tracing / compile / export (dynamo, ``jit.trace``, fake or proxy tensors,
    any dispatch or function mode), functorch transforms, tensor subclasses, autograd, or a
    non-CPU device (where a registered kernel, e.g. Triton on CUDA, may replace the reference).
    Otherwise, plain eager CPU, they call the implementation the op itself would run and skip
    the dispatcher round trip (~10-60 us per call, x layers x tokens when decoding).
    """
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()  # first: dynamo folds these
            or torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack()
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not Tensor or t.device.type != "cpu" or (grad and t.requires_grad):
            return False
    return True


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 for the softmax; float64 inputs keep float64."""
    return torch.promote_types(dtype, torch.float32)


def _safe_softmax_(scores: Tensor) -> Tensor:
    """In-place softmax over the last dim; fully masked rows (all ``-inf``) give 0, not NaN."""
    finfo = torch.finfo(scores.dtype)
    row_max = scores.amax(dim=-1, keepdim=True).clamp_min_(finfo.min)
    scores.sub_(row_max).exp_()
    return scores.div_(scores.sum(dim=-1, keepdim=True).clamp_min_(finfo.tiny))


def _check_attention_args(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                          kv_length: Tensor | None, causal: bool, window: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D: q [B, Hq, T, D], k/v [B, Hkv, S, D]")
    b, hq, t, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if k.shape[1] == 0 or hq % k.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({k.shape[1]})")
    if bias is not None and tuple(bias.shape) != tuple(k.shape[:3]):
        raise ValueError(f"bias must be [B, Hkv, S] = {tuple(k.shape[:3])}, got {tuple(bias.shape)}")
    if kv_length is not None and (tuple(kv_length.shape) != (b,) or kv_length.dtype != torch.int64):
        raise ValueError(f"kv_length must be int64 [B] = [{b}], got {kv_length.dtype} "
                         f"{tuple(kv_length.shape)}")
    if window < 0:
        raise ValueError("window must be >= 0")
    if window > 0 and not causal:
        raise ValueError("a sliding window (window > 0) needs causal=True")
    if causal and t > k.shape[2]:
        raise ValueError(f"causal attention needs T <= S (the queries are the last T keys), "
                         f"got T={t}, S={k.shape[2]}")


def _trim_on_cpu(k: Tensor, v: Tensor, bias: Tensor | None, kv_length: Tensor | None
                 ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """On CPU, cut the buffers to the longest valid length (a free host read there).

    When every row has the same length the length mask disappears and the unmasked fast paths
    apply: a full-head buffer of ``max_context`` slots costs what its filled part costs.
    """
    if kv_length is None or not host_reads_free(kv_length):
        return k, v, bias, kv_length
    lengths = kv_length.tolist()
    longest = max(lengths, default=0)
    if min(lengths, default=0) < 0 or longest > k.shape[2]:
        raise ValueError(f"kv_length must lie in [0, S={k.shape[2]}], got {lengths}")
    k, v = k[:, :, :longest], v[:, :, :longest]
    bias = None if bias is None else bias[:, :, :longest]
    return k, v, bias, (None if min(lengths) == longest else kv_length)


def _length_mask(kv_length: Tensor, t0: int, t1: int, t: int, s: int, causal: bool,
                 window: int) -> Tensor:
    """``[B, t1 - t0, S]`` visible keys of queries ``t0..t1`` when row ``b`` holds ``kv_length[b]``
    keys and its ``T`` queries are the last of them."""
    kpos = torch.arange(s, device=kv_length.device)
    allowed = (kpos < kv_length[:, None])[:, None, :]
    if causal:
        qpos = kv_length[:, None] - t + torch.arange(t0, t1, device=kv_length.device)
        allowed = allowed & (kpos <= qpos[:, :, None])
        if window > 0:
            allowed = allowed & (kpos > qpos[:, :, None] - window)
    return allowed


def _attention_decode(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                      kv_length: Tensor | None, window: int, scale: float) -> Tensor:
    """T == 1: grouped matmul-softmax-matmul, no repeat of k/v."""
    b, hq, _, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    if kv_length is None and 0 < window < s:  # the query is the last key: keep the last `window`
        k, v = k[:, :, s - window:], v[:, :, s - window:]
        bias = None if bias is None else bias[:, :, s - window:]
    qg = q.reshape(b, hkv, g, d) * scale
    # [B, Hkv, g, S]; a fresh tensor (matmul output or its upcast), so the softmax can be in place
    scores = torch.matmul(qg, k.transpose(-1, -2)).to(_compute_dtype(q.dtype))
    if bias is not None:
        scores += bias.unsqueeze(2)
    if kv_length is not None:
        allowed = _length_mask(kv_length, 0, 1, 1, k.shape[2], True, window)  # [B, 1, S]
        scores.masked_fill_(~allowed[:, None], float("-inf"))
    probs = _safe_softmax_(scores).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, hq, 1, d).to(q.dtype)


def _attention_sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                    mask: Tensor | None = None) -> Tensor:
    """No bias: the fused kernel. Without ``mask`` none is materialised (``causal`` needs
    T == S); a ``[T, S]`` boolean ``mask`` (True: visible) covers the other static cases."""
    g = q.shape[1] // k.shape[1]
    if g > 1 and not _HAS_ENABLE_GQA:  # torch < 2.5
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
        g = 1
    kwargs = {"enable_gqa": True} if g > 1 else {}
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **kwargs)


def _offset_causal_mask(t: int, s: int, window: int, device: torch.device) -> Tensor:
    """``[T, S]``: query ``i`` is key ``S - T + i`` and sees the keys up to it (and within
    ``window`` of it); every query sees at least itself."""
    qpos = torch.arange(s - t, s, device=device)[:, None]
    kpos = torch.arange(s, device=device)[None, :]
    allowed = kpos <= qpos
    return allowed & (kpos > qpos - window) if window > 0 else allowed


def _attention_chunked(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                       kv_length: Tensor | None, causal: bool, window: int, scale: float) -> Tensor:
    """General masked path, in query chunks so memory is bounded by the chunk, not T x S."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    cdt = _compute_dtype(q.dtype)
    out = q.new_empty(b, hq, t, d)
    qg = q.reshape(b, hkv, g, t, d)
    offset = s - t  # without kv_length, query t sits at key position offset + t
    keys = min(s, QUERY_CHUNK + window) if causal and window > 0 and kv_length is None else s
    chunk = max(1, min(QUERY_CHUNK, _MAX_SCORES // max(1, b * hq * keys)))
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        lo, hi = 0, s
        if causal and kv_length is None:  # static positions: only the keys the chunk can see
            hi = offset + t1
            if window > 0:
                lo = max(0, offset + t0 - window + 1)
        ks = k[:, :, lo:hi].to(cdt).unsqueeze(2)  # [B, Hkv, 1, Sk, D]
        vs = v[:, :, lo:hi].to(cdt).unsqueeze(2)
        scores = torch.matmul(qg[:, :, :, t0:t1].to(cdt) * scale, ks.transpose(-1, -2))
        if bias is not None:
            scores += bias[:, :, None, None, lo:hi]
        if kv_length is not None:
            allowed = _length_mask(kv_length, t0, t1, t, s, causal, window)[:, None, None]
            scores.masked_fill_(~allowed, float("-inf"))
        elif causal:
            qpos = torch.arange(offset + t0, offset + t1, device=q.device).unsqueeze(1)
            kpos = torch.arange(lo, hi, device=q.device).unsqueeze(0)
            allowed = kpos <= qpos
            if window > 0:
                allowed = allowed & (kpos > qpos - window)
            scores.masked_fill_(~allowed, float("-inf"))
        o = torch.matmul(_safe_softmax_(scores), vs)  # [B, Hkv, g, tc, D]
        out[:, :, t0:t1] = o.reshape(b, hq, t1 - t0, d).to(out.dtype)
    return out


def _budgeted_attention_ref(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                            kv_length: Tensor | None, causal: bool, window: int,
                            scale: float) -> Tensor:
    _check_attention_args(q, k, v, bias, kv_length, causal, window)
    k, v, bias, kv_length = _trim_on_cpu(k, v, bias, kv_length)
    t, s = q.shape[2], k.shape[2]
    if t == 0:
        return q.new_zeros(q.shape)
    if s == 0:  # nothing to attend to: guarded like a fully masked row
        return q.new_zeros(q.shape)
    if t == 1:
        return _attention_decode(q, k, v, bias, kv_length, window, scale)
    if kv_length is None and bias is None and window == 0 and (not causal or t == s):
        return _attention_sdpa(q, k, v, causal, scale)
    if kv_length is None and bias is None and causal and t <= QUERY_CHUNK:
        # queries after cached keys (a prefill chunk, an extend): static mask, fused kernel
        return _attention_sdpa(q, k, v, True, scale, _offset_causal_mask(t, s, window, q.device))
    return _attention_chunked(q, k, v, bias, kv_length, causal, window, scale)


@torch.library.custom_op("kvcompile::budgeted_attention", mutates_args=())
def _budgeted_attention_op(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                           kv_length: Tensor | None, causal: bool, window: int,
                           scale: float) -> Tensor:
    return _budgeted_attention_ref(q, k, v, bias, kv_length, causal, window, scale)


@_budgeted_attention_op.register_fake
def _budgeted_attention_fake(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                             kv_length: Tensor | None, causal: bool, window: int,
                             scale: float) -> Tensor:
    return q.new_empty(q.shape)


def budgeted_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, *,
                       causal: bool = False, window: int = 0, scale: float | None = None,
                       kv_length: Tensor | None = None) -> Tensor:
    """Attention of ``q [B,Hq,T,D]`` over ``k, v [B,Hkv,S,D]`` with a per-slot logit ``bias``.

    GQA: query head ``i`` uses KV head ``i // (Hq // Hkv)``. ``kv_length`` (int64 ``[B]``, on
    the tensors' device) says that row ``b`` holds only its first ``kv_length[b]`` slots (a
    preallocated buffer filled that far; default ``S``); let ``n_b`` be that length. ``causal``:
    the queries are the last ``T`` of the ``n_b`` keys (query ``t`` sees keys
    ``j <= n_b - T + t``); ``window > 0`` (needs ``causal``) also requires
    ``j > n_b - T + t - window``. A row with no visible key returns 0.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if _plain_eager_cpu(q, k, v, bias, kv_length):
        return _budgeted_attention_ref(q, k, v, bias, kv_length, bool(causal), int(window),
                                       float(scale))
    return _budgeted_attention_op(q, k, v, bias, kv_length, bool(causal), int(window),
                                  float(scale))


def _check_update_args(k_buf: Tensor, v_buf: Tensor, bias: Tensor, counters: Tensor,
                       k_new: Tensor, v_new: Tensor, capacity: int, window: int) -> None:
    if window < 1:
        raise ValueError("the budgeted cache needs a window of at least 1")
    if k_buf.dim() != 4 or k_buf.shape != v_buf.shape or k_buf.shape[2] != capacity:
        raise ValueError(f"k_buf/v_buf must be [B, H, C={capacity}, D], got "
                         f"{tuple(k_buf.shape)} / {tuple(v_buf.shape)}")
    b, h, _, d = k_buf.shape
    if tuple(bias.shape) != (b, h, capacity):
        raise ValueError(f"bias must be [B, H, C] = {(b, h, capacity)}, got {tuple(bias.shape)}")
    if tuple(counters.shape) != (b, 4) or counters.dtype != torch.int64:
        raise ValueError(f"counters must be int64 [B, 4], got {counters.dtype} {tuple(counters.shape)}")
    if tuple(k_new.shape) != (b, h, 1, d) or tuple(v_new.shape) != (b, h, 1, d):
        raise ValueError(f"k_new/v_new must be [B, H, 1, D] = {(b, h, 1, d)}, got "
                         f"{tuple(k_new.shape)} / {tuple(v_new.shape)}")


def _budgeted_cache_update_ref(k_buf: Tensor, v_buf: Tensor, bias: Tensor, counters: Tensor,
                               k_new: Tensor, v_new: Tensor, sinks: int, compensation: int,
                               selected: int, window: int) -> None:
    """Vectorised over the batch, no data-dependent Python control flow, writes in place."""
    s, c, h, w = sinks, compensation, selected, window
    _check_update_args(k_buf, v_buf, bias, counters, k_new, v_new, s + c + h + w, w)
    rows = torch.arange(k_buf.shape[0], device=k_buf.device)
    sink_used, pushed, sel_used, comp_n = counters.unbind(1)
    in_sink = sink_used < s
    ring_full = ~in_sink & (pushed >= w)
    ring_slot = s + c + h + torch.remainder(pushed, w)  # oldest window token / slot to write
    to_sel = ring_full & (sel_used < h)
    to_comp = ring_full & ~to_sel if c == 1 else torch.zeros_like(ring_full)

    k_old = k_buf[rows, :, ring_slot]  # [B, H, D] copies, taken before the slot is overwritten
    v_old = v_buf[rows, :, ring_slot]
    if h > 0:  # move the evicted token into the next selected slot (no-op copy for other rows)
        dst = torch.where(to_sel, s + c + sel_used, ring_slot)
        k_buf[rows, :, dst] = k_old
        v_buf[rows, :, dst] = v_old
        bias[rows, :, dst] = torch.where(to_sel.unsqueeze(1), 0.0, bias[rows, :, dst])
    if c == 1:  # fold into the running mean: x <- (n x + x_old) / (n + 1)
        fold = to_comp[:, None, None]
        for buf, old in ((k_buf, k_old), (v_buf, v_old)):
            cdt = _compute_dtype(buf.dtype)
            n = comp_n.to(cdt)[:, None, None]
            cur = buf[:, :, s]
            mean = (n * cur.to(cdt) + old.to(cdt)) / (n + 1)
            mean = torch.where(n == 0, old.to(cdt), mean)  # first fold ignores the slot content
            buf[:, :, s] = torch.where(fold, mean.to(buf.dtype), cur)
        log_n = torch.log((comp_n + 1).to(torch.float64)).to(bias.dtype)[:, None]  # see log_count
        bias[:, :, s] = torch.where(to_comp.unsqueeze(1), log_n, bias[:, :, s])

    slot = torch.where(in_sink, sink_used, ring_slot)
    k_buf[rows, :, slot] = k_new[:, :, 0].to(k_buf.dtype)
    v_buf[rows, :, slot] = v_new[:, :, 0].to(v_buf.dtype)
    bias[rows, :, slot] = 0.0
    counters.add_(torch.stack([in_sink, ~in_sink, to_sel, to_comp], dim=1).to(counters.dtype))


def _budgeted_cache_update_uniform(k_buf: Tensor, v_buf: Tensor, bias: Tensor,
                                   counters: Tensor, state: list[int], k_new: Tensor,
                                   v_new: Tensor, sinks: int, compensation: int, selected: int,
                                   window: int) -> None:
    """The decode rule when every batch row has the same ``counters`` row ``state``.

    Bit-for-bit the arithmetic of :func:`_budgeted_cache_update_ref` (fold
    ``(n x + x_old) / (n + 1)`` in the compute dtype, first fold copies ``x_old``, bias
    :func:`log_count` for the bias), but the slots are known Python ints: a few slice copies
    instead of gathers, scatters and ``where`` over the whole batch.
    """
    s, c, h, w = sinks, compensation, selected, window
    sink_used, pushed, sel_used, comp_n = state
    if sink_used < s:
        slot = sink_used
        sink_used += 1
    else:
        slot = s + c + h + pushed % w  # oldest window token, then the new token's slot
        if pushed >= w:
            if sel_used < h:  # the evicted token moves into the next selected slot
                dst = s + c + sel_used
                k_buf.select(2, dst).copy_(k_buf.select(2, slot))
                v_buf.select(2, dst).copy_(v_buf.select(2, slot))
                bias.select(2, dst).fill_(0.0)
                sel_used += 1
            elif c == 1:  # fold into the running mean
                for buf in (k_buf, v_buf):
                    old, cur = buf.select(2, slot), buf.select(2, s)
                    if comp_n == 0:
                        cur.copy_(old)
                    else:
                        cdt = _compute_dtype(buf.dtype)
                        n, n1 = _scalar(comp_n, cdt), _scalar(comp_n + 1, cdt)
                        if cdt == buf.dtype:  # in place: same roundings as the reference
                            cur.mul_(n).add_(old).div_(n1)
                        else:
                            cur.copy_(torch.mul(cur.to(cdt), n).add_(old.to(cdt)).div_(n1))
                comp_n += 1
                bias.select(2, s).fill_(log_count(comp_n, bias.dtype))
        pushed += 1
    k_buf.narrow(2, slot, 1).copy_(k_new)
    v_buf.narrow(2, slot, 1).copy_(v_new)
    bias.select(2, slot).fill_(0.0)
    counters.copy_(torch.tensor([sink_used, pushed, sel_used, comp_n], dtype=counters.dtype))


@functools.lru_cache(maxsize=4096)
def _scalar(value: int, dtype: torch.dtype) -> Tensor:
    """A 1-element CPU tensor (not 0-d: kept a broadcast operand like the reference's ``n``).
    Cached across calls, so never an inference tensor."""
    with torch.inference_mode(False):
        return torch.tensor([value], dtype=dtype)


@functools.lru_cache(maxsize=65536)
def log_count(n: int, dtype: torch.dtype) -> float:
    """The compensation bias ``ln n`` stored in ``dtype``: computed in float64, then rounded.

    The one definition every writer of the bias follows (prefill compression, both update
    paths, the Triton kernel, the ONNX body), so they agree bit for bit.
    """
    return float(torch.tensor(math.log(n), dtype=torch.float64).to(dtype))


def _budgeted_cache_update_impl(k_buf: Tensor, v_buf: Tensor, bias: Tensor, counters: Tensor,
                                k_new: Tensor, v_new: Tensor, sinks: int, compensation: int,
                                selected: int, window: int) -> None:
    """CPU with identical counters in every row (B == 1, or a batch decoded in lockstep): the
    scalar fast path; otherwise (rows out of step, or another device: no host sync) the
    vectorised reference."""
    if host_reads_free(counters):
        _check_update_args(k_buf, v_buf, bias, counters, k_new, v_new,
                           sinks + compensation + selected + window, window)
        rows = counters.tolist()
        if all(row == rows[0] for row in rows[1:]):
            _budgeted_cache_update_uniform(k_buf, v_buf, bias, counters, rows[0], k_new, v_new,
                                           sinks, compensation, selected, window)
            return
    _budgeted_cache_update_ref(k_buf, v_buf, bias, counters, k_new, v_new,
                               sinks, compensation, selected, window)


@torch.library.custom_op(
    "kvcompile::budgeted_cache_update", mutates_args=("k_buf", "v_buf", "bias", "counters")
)
def _budgeted_cache_update_op(k_buf: Tensor, v_buf: Tensor, bias: Tensor, counters: Tensor,
                              k_new: Tensor, v_new: Tensor, sinks: int, compensation: int,
                              selected: int, window: int) -> None:
    _budgeted_cache_update_impl(k_buf, v_buf, bias, counters, k_new, v_new,
                                sinks, compensation, selected, window)


@_budgeted_cache_update_op.register_fake
def _budgeted_cache_update_fake(k_buf: Tensor, v_buf: Tensor, bias: Tensor, counters: Tensor,
                                k_new: Tensor, v_new: Tensor, sinks: int, compensation: int,
                                selected: int, window: int) -> None:
    return None


def budgeted_cache_update(k_buf: Tensor, v_buf: Tensor, bias: Tensor, counters: Tensor,
                          k_new: Tensor, v_new: Tensor, layout: BudgetLayout) -> None:
    """Append one token per batch row to a budgeted head group, in place.

    Buffers ``[B, H, C, D]`` (slots: sinks, compensation, selected, ring window), ``bias``
    ``[B, H, C]`` (float32 in the cache), ``counters`` int64 ``[B, 4]`` =
    ``(sink_used, window_pushed, selected_used, comp_n)``, ``k_new/v_new [B, H, 1, D]``.
    When the ring is full its oldest token moves to a free selected slot, else is folded into
    the compensation mean (``c == 1``), else dropped; the new token takes its ring slot.
    """
    args = (k_buf, v_buf, bias, counters, k_new, v_new,
            layout.sinks, layout.compensation, layout.selected, layout.window)
    if _plain_eager_cpu(k_buf, v_buf, bias, counters, k_new, v_new):
        _budgeted_cache_update_impl(*args)
    else:
        _budgeted_cache_update_op(*args)
