"""The static-budget KV cache (docs/DESIGN.md, "Static-budget cache semantics").

Every buffer is allocated once, up front, so that KV memory is exactly what the plan predicts
and never grows while decoding: full heads get ``max_context`` slots and a length counter,
budgeted heads ``C = s + c + h + w`` slots updated in place by
``kvcompile::budgeted_cache_update``. All attention goes through
``kvcompile::budgeted_attention``, so graphs see the same two custom ops as the ONNX export.

Heads are expected in the permuted order (full KV heads first, then budgeted ones), and the
query heads follow their KV head: the first ``n_full * g`` query heads belong to full heads.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from kvcompile.errors import ContextLengthError
from kvcompile.plan import SELECTIONS, BudgetLayout, LayerPlan, Plan, Selection

from .ops import budgeted_attention, budgeted_cache_update, host_reads_free, log_count
from .quant_cache import QuantizedBudgetedBuffer, QuantizedFullBuffer
from .quant_ops import DequantMemo

__all__ = [
    "BudgetedBuffer",
    "ContextOverflowError",
    "FullBuffer",
    "LayerKV",
    "StaticKVCache",
    "compress_prefill",
    "selection_scores",
]



def bias_dtype(kv_dtype: torch.dtype) -> torch.dtype:
    """The slot bias is float32 for half/bf16/float32 KV (``ln n`` must not be rounded by bf16),
    float64 for float64 KV."""
    return torch.promote_types(kv_dtype, torch.float32)


class ContextOverflowError(ContextLengthError, ValueError):
    """More tokens than the full-head buffers were allocated for (a usage error: exit 2)."""


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class BudgetedBuffer:
    """Fixed-capacity KV of the budgeted heads of one layer, ``[B, H, C, D]``.

    ``bias [B, H, C]`` (float32, float64 for float64 KV) is the per-slot logit bias (0 occupied, ln n compensation,
    -inf empty); ``counters [B, 4]`` int64 = (sink_used, window_pushed, selected_used, comp_n).
    """

    k: Tensor
    v: Tensor
    bias: Tensor
    counters: Tensor
    layout: BudgetLayout

    @classmethod
    def empty(cls, batch: int, heads: int, head_dim: int, layout: BudgetLayout,
              dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> BudgetedBuffer:
        """All slots empty. Zeros, not garbage: an empty slot's 0 weight must not meet a NaN."""
        shape = (batch, heads, layout.capacity, head_dim)
        return cls(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
            bias=torch.full(shape[:3], float("-inf"), dtype=bias_dtype(dtype), device=device),
            counters=torch.zeros(batch, 4, dtype=torch.int64, device=device),
            layout=layout,
        )

    def rows(self, start: int, stop: int) -> BudgetedBuffer:
        """Rows ``start .. stop - 1`` as views: writes through them land in this buffer."""
        return BudgetedBuffer(self.k[start:stop], self.v[start:stop], self.bias[start:stop],
                              self.counters[start:stop], self.layout)

    def copy_row(self, src: int, dst: int) -> None:
        for t in (self.k, self.v, self.bias, self.counters):
            t[dst].copy_(t[src])

    def reset(self) -> None:
        """Forget every token in place (buffers keep their storage)."""
        self.bias.fill_(float("-inf"))
        self.counters.zero_()
        self.k.zero_()
        self.v.zero_()

    def append(self, k_new: Tensor, v_new: Tensor) -> None:
        """Add one token per row (``[B, H, 1, D]``) with the decode rule, in place."""
        budgeted_cache_update(self.k, self.v, self.bias, self.counters, k_new, v_new, self.layout)

    def attend(self, q: Tensor, scale: float | None = None) -> Tensor:
        """Attention of ``q [B, g*H, T, D]`` over the occupied slots (bias masks the rest)."""
        return budgeted_attention(q, self.k, self.v, self.bias, scale=scale)

    def compress(self, k: Tensor, v: Tensor, scores: Tensor | None) -> None:
        """A prompt compressed into this (reset) buffer: :func:`compress_prefill`."""
        compress_prefill(k, v, scores, self.layout, out=self)

    @property
    def nbytes(self) -> int:
        """All the group's KV state: keys, values, bias, counters (``kvcompile.memory``)."""
        return _nbytes(self.k, self.v, self.bias, self.counters)


def compress_prefill(k: Tensor, v: Tensor, scores: Tensor | None, layout: BudgetLayout,
                     out: BudgetedBuffer | None = None) -> BudgetedBuffer:
    """Compress a prompt's ``k, v [B, H, L, D]`` into a budgeted buffer.

    Same state as appending the tokens one by one, except that the selected slots hold the
    top-``h`` middle tokens by ``scores [B, H, L]`` (higher = keep; ties -> earlier; kept in
    position order; ``None`` keeps the most recent middle tokens) and the other middle tokens
    are folded into the compensation slot as a plain mean (dropped when ``c == 0``).
    ``out`` (an empty buffer of the right shape) is filled in place, else a new one is made.
    """
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"k/v must be [B, H, L, D] of the same shape, got {tuple(k.shape)} / "
                         f"{tuple(v.shape)}")
    b, nh, n_tok, d = k.shape
    if scores is not None and tuple(scores.shape) != (b, nh, n_tok):
        raise ValueError(f"scores must be [B, H, L] = {(b, nh, n_tok)}, got {tuple(scores.shape)}")
    if out is None:
        out = BudgetedBuffer.empty(b, nh, d, layout, k.dtype, k.device)
    elif out.k.shape != (b, nh, layout.capacity, d) or out.layout != layout:
        raise ValueError(f"output buffer {tuple(out.k.shape)} / {out.layout} does not fit "
                         f"{(b, nh, layout.capacity, d)} / {layout}")
    s, c, h, w = layout.sinks, layout.compensation, layout.selected, layout.window
    out.reset()
    n_sink = min(n_tok, s)
    rest = n_tok - n_sink
    n_win = min(rest, w)
    n_mid = rest - n_win
    n_sel = min(n_mid, h)
    n_comp = n_mid - n_sel if c == 1 else 0

    out.k[:, :, :n_sink] = k[:, :, :n_sink]
    out.v[:, :, :n_sink] = v[:, :, :n_sink]
    out.bias[:, :, :n_sink] = 0.0

    ring = s + c + h
    offsets = torch.arange(rest - n_win, rest, device=k.device)  # window tokens, after the sinks
    slots = ring + offsets % w
    out.k[:, :, slots] = k[:, :, s + offsets]
    out.v[:, :, slots] = v[:, :, s + offsets]
    out.bias[:, :, slots] = 0.0

    if n_mid > 0 and h > 0:
        mid_k, mid_v = k[:, :, s:s + n_mid], v[:, :, s:s + n_mid]
        if n_mid <= h:
            keep = torch.arange(n_mid, device=k.device).expand(b, nh, n_mid)
        elif scores is None:
            keep = torch.arange(n_mid - h, n_mid, device=k.device).expand(b, nh, h)
        else:  # stable descending sort: equal scores keep the earlier position first
            order = torch.sort(scores[:, :, s:s + n_mid], dim=-1, descending=True, stable=True)[1]
            keep = order[:, :, :h].sort(dim=-1).values
        idx = keep.unsqueeze(-1).expand(b, nh, n_sel, d)
        out.k[:, :, c + s:c + s + n_sel] = mid_k.gather(2, idx)
        out.v[:, :, c + s:c + s + n_sel] = mid_v.gather(2, idx)
        out.bias[:, :, c + s:c + s + n_sel] = 0.0
    else:
        keep = None
    if n_comp > 0:
        folded = torch.ones(b, nh, n_mid, dtype=torch.bool, device=k.device)
        if keep is not None:
            folded.scatter_(2, keep, False)
        weight = folded.unsqueeze(-1)
        cdt = torch.promote_types(k.dtype, torch.float32)
        for src, buf in ((k, out.k), (v, out.v)):
            mid = src[:, :, s:s + n_mid].to(cdt)
            buf[:, :, s] = ((mid * weight).sum(dim=2) / n_comp).to(buf.dtype)
        out.bias[:, :, s] = log_count(n_comp, out.bias.dtype)
    out.counters[:, 0] = n_sink
    out.counters[:, 1] = rest
    out.counters[:, 2] = n_sel
    out.counters[:, 3] = n_comp
    return out


def selection_scores(q: Tensor, k: Tensor, scale: float, selection: str,
                     observation_window: int) -> Tensor:
    """Per-key keep scores ``[B, Hkv, L]`` for :func:`compress_prefill` (higher = keep).

    ``"attention"``: causal attention probability each key receives from the last
    ``observation_window`` queries, summed over those queries and the group's query heads.
    ``q`` holds the last ``T`` queries of the ``L`` keys (``T = L`` after a one-go prefill; a
    chunked prefill passes its last chunk, which holds at least the observation window).
    ``"key_norm"``: ``-||k||_2`` (low-norm keys are kept).
    """
    if selection == "key_norm":
        return -torch.linalg.vector_norm(k.to(torch.promote_types(k.dtype, torch.float32)), dim=-1)
    if selection != "attention":
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    b, hq, n_q, d = q.shape
    hkv, n_tok = k.shape[1], k.shape[2]
    n_obs = max(1, min(observation_window, n_tok))
    if n_q < n_obs or n_q > n_tok:
        raise ValueError(f"the scores need the last {n_obs} queries of the {n_tok} keys, got "
                         f"{n_q} queries")
    cdt = torch.promote_types(q.dtype, torch.float32)
    q_obs = q[:, :, n_q - n_obs:].to(cdt).reshape(b, hkv, hq // hkv, n_obs, d) * scale
    logits = torch.matmul(q_obs, k.to(cdt).unsqueeze(2).transpose(-1, -2))  # [B,Hkv,g,o,L]
    qpos = torch.arange(n_tok - n_obs, n_tok, device=q.device).unsqueeze(1)
    future = torch.arange(n_tok, device=q.device).unsqueeze(0) > qpos
    probs = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    return probs.sum(dim=(2, 3))


def _overflow(length: int, n_new: int, max_context: int) -> ContextOverflowError:
    return ContextOverflowError(
        f"context overflow: {length} + {n_new} tokens exceed max_context={max_context} of the "
        f"full-head KV buffers; allocate the cache with a larger max_context or use a shorter "
        f"prompt / fewer new tokens"
    )


@dataclass
class FullBuffer:
    """Preallocated ``[B, H, max_context, D]`` KV of the full heads.

    ``length`` (int64 ``[B]``, on the buffers' device) counts each row's filled slots. Writes go
    to slot ``length[b]`` by index and attention masks by ``length``, so every decode step has
    the same shapes and reads nothing back to the host (CUDA graphs, ONNX, the kernels).
    """

    k: Tensor
    v: Tensor
    length: Tensor

    @classmethod
    def empty(cls, batch: int, heads: int, max_context: int, head_dim: int,
              dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> FullBuffer:
        shape = (batch, heads, max_context, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(batch, dtype=torch.int64, device=device))

    @property
    def max_context(self) -> int:
        return self.k.shape[2]

    def fill(self, k: Tensor, v: Tensor) -> None:
        """A prompt into the empty buffer (the quantized buffer's bulk path; here a write)."""
        self.write(k, v)

    def write(self, k: Tensor, v: Tensor) -> None:
        """Append ``T`` tokens (``[B, H, T, D]``) after each row's filled slots.

        On CPU the lengths are read (free there) to refuse an overflow and to write by slice;
        on a device the caller checks room with its host-side count (:class:`LayerKV`).
        """
        n_new = k.shape[2]
        if host_reads_free(self.length):
            lengths = self.length.tolist()
            if max(lengths) + n_new > self.max_context:
                raise _overflow(max(lengths), n_new, self.max_context)
            if min(lengths) == max(lengths):
                start = lengths[0]
                self.k[:, :, start:start + n_new] = k
                self.v[:, :, start:start + n_new] = v
                self.length += n_new
                return
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        slots = self.length[:, None] + torch.arange(n_new, device=k.device)  # [B, T]
        self.k[rows, :, slots] = k.transpose(1, 2).to(self.k.dtype)  # indexed view is [B, T, H, D]
        self.v[rows, :, slots] = v.transpose(1, 2).to(self.v.dtype)
        self.length += n_new

    def attend(self, q: Tensor, scale: float | None = None, causal: bool = True) -> Tensor:
        """Attention over each row's filled slots; ``causal``: q are the last T written."""
        return budgeted_attention(q, self.k, self.v, None, causal=causal, scale=scale,
                                  kv_length=self.length)

    def reset(self) -> None:
        self.length.zero_()

    def rows(self, start: int, stop: int) -> FullBuffer:
        """Rows ``start .. stop - 1`` as views: writes through them land in this buffer."""
        return FullBuffer(self.k[start:stop], self.v[start:stop], self.length[start:stop])

    def copy_row(self, src: int, dst: int) -> None:
        """Row ``src``'s filled slots and length into row ``dst`` (slots past it are ignored)."""
        n = int(self.length[src])
        self.k[dst, :, :n].copy_(self.k[src, :, :n])
        self.v[dst, :, :n].copy_(self.v[src, :, :n])
        self.length[dst].copy_(self.length[src])

    @property
    def nbytes(self) -> int:
        return _nbytes(self.k, self.v, self.length)


@dataclass
class LayerKV:
    """One layer's cache: full buffer for the first ``n_full`` KV heads, budgeted for the rest.

    ``sliding_window`` > 0 marks a layer the source model runs as sliding-window attention:
    its prefill attention uses that window (and it should have only budgeted heads).
    ``length`` is the host-side count of tokens fed (every row in step); the buffers keep
    their own device-side state.
    """

    full: FullBuffer | QuantizedFullBuffer | None
    budgeted: BudgetedBuffer | QuantizedBudgetedBuffer | None
    group_size: int
    sliding_window: int = 0
    length: int = 0

    @classmethod
    def allocate(cls, layer: LayerPlan, batch: int, max_context: int, head_dim: int,
                 group_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> LayerKV:
        """Buffers for one :class:`LayerPlan`; sliding layers take their window from the layout."""
        if layer.sliding and layer.full_heads:
            raise ValueError("a sliding-window layer keeps only budgeted heads (its window)")
        full: FullBuffer | QuantizedFullBuffer | None = None
        if layer.quantized_full:
            full = QuantizedFullBuffer.empty(batch, len(layer.full_heads), max_context, head_dim,
                                             layer.full_storage, dtype, device)
        elif layer.full_heads:
            full = FullBuffer.empty(batch, len(layer.full_heads), max_context, head_dim,
                                    dtype, device)
        budgeted: BudgetedBuffer | QuantizedBudgetedBuffer | None = None
        layout = layer.layout
        window = layer.prefill_window
        if window:
            # the model's window, but never more slots than the cache can hold tokens
            # (transformers' static sliding layer: min(window, max_cache_len); kvcompile.memory)
            window = min(window, max_context)
            layout = BudgetLayout(0, 0, 0, window)
        if layer.quantized_selected:
            assert layout is not None
            budgeted = QuantizedBudgetedBuffer.empty(batch, len(layer.budgeted_heads), head_dim,
                                                     layout, layer.budget_storage, dtype, device)
        elif layer.budgeted_heads:
            assert layout is not None
            budgeted = BudgetedBuffer.empty(batch, len(layer.budgeted_heads), head_dim,
                                            layout, dtype, device)
        return cls(full, budgeted, group_size, sliding_window=window)

    @property
    def n_full(self) -> int:
        if self.full is None:
            return 0
        return self.full.k_res.shape[1] if isinstance(self.full, QuantizedFullBuffer) else self.full.k.shape[1]

    @property
    def quantized(self) -> bool:
        """Some group stores codes: several new tokens are then appended one at a time."""
        return isinstance(self.full, QuantizedFullBuffer) or isinstance(self.budgeted,
                                                                        QuantizedBudgetedBuffer)

    def _split_q(self, q: Tensor) -> tuple[Tensor, Tensor]:
        nq = self.n_full * self.group_size
        return q[:, :nq], q[:, nq:]

    def _check_room(self, n_new: int) -> None:
        if self.full is not None and self.length + n_new > self.full.max_context:
            raise _overflow(self.length, n_new, self.full.max_context)

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                selection: Selection = Selection()) -> Tensor:
        """Exact causal attention over the prompt for all heads, then store (and compress).

        ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]`` (post-RoPE, permuted); returns
        ``[B, Hq, L, D]``. ``selection``: the plan's (``Plan.selection``).
        """
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        if self.length:
            raise ValueError(f"prefill into a non-empty layer cache ({self.length} tokens); "
                             f"reset() it first or use extend()")
        out = budgeted_attention(q, k, v, None, causal=True, window=self.sliding_window,
                                 scale=scale)
        self.store(q, k, v, scale, selection)
        return out

    def store(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
              selection: Selection = Selection()) -> None:
        """The storing half of :meth:`prefill`, for a second cache fed the same prompt.

        Lets a caller keep several caches (e.g. the artifact's and the uncompressed
        baseline's) from one exact prefill without recomputing the attention.
        """
        if self.length:
            raise ValueError(f"prefill into a non-empty layer cache ({self.length} tokens); "
                             f"reset() it first or use extend()")
        self._check_room(k.shape[2])
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        nf = self.n_full
        if self.full is not None:
            self.full.fill(k[:, :nf], v[:, :nf])
        if self.budgeted is not None:
            kb, vb = k[:, nf:], v[:, nf:]
            lay = self.budgeted.layout
            needs_scores = k.shape[2] - lay.sinks - lay.window > lay.selected > 0
            scores = None
            if needs_scores:
                scores = selection_scores(self._split_q(q)[1], kb, scale, selection.rule,
                                          selection.observation_window)
            self.budgeted.compress(kb, vb, scores)
        self.length = k.shape[2]

    def extend(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
        """Attention for ``T >= 1`` new tokens after the cached ones; returns ``[B, Hq, T, D]``.

        Full heads: write all ``T`` then causal attention. Budgeted heads: token by token,
        append then attend (the only way a fixed-size ring can serve several new tokens). A
        layer with quantized groups: ``T`` decode steps (codes are written by the one-token
        rule), each group's codes dequantized once per change rather than once per step.
        """
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        n_new = k.shape[2]
        self._check_room(n_new)  # first: nothing is touched when the full heads would overflow
        nf, nq = self.n_full, self.n_full * self.group_size
        q_full, q_budget = self._split_q(q)
        if n_new > 1 and self.quantized:  # codes are written by the one-token rule: T decode steps
            memos = {"full": DequantMemo(), "budgeted": DequantMemo()}
            return torch.cat([self._decode_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                                scale, memos) for t in range(n_new)], dim=2)
        if n_new == 1:  # decode: no output buffer to fill, no per-token slicing
            return self._decode_step(q, k, v, scale)
        out = q.new_empty(q.shape)
        if self.full is not None:
            self.full.write(k[:, :nf], v[:, :nf])
            out[:, :nq] = self.full.attend(q_full, scale, causal=True)
        if self.budgeted is not None:
            for t in range(n_new):
                self.budgeted.append(k[:, nf:, t:t + 1], v[:, nf:, t:t + 1])
                out[:, nq:, t:t + 1] = self.budgeted.attend(q_budget[:, :, t:t + 1], scale)
        self.length += n_new
        return out

    def _decode_step(self, q: Tensor, k: Tensor, v: Tensor, scale: float,
                     memos: dict[str, DequantMemo] | None = None) -> Tensor:
        """One new token: write it, then attend. ``memos``: the quantized groups' codes
        dequantized by an earlier step of the same extend (:class:`DequantMemo`)."""
        nf = self.n_full
        q_full, q_budget = self._split_q(q)
        parts = []
        if self.full is not None:
            self.full.write(k[:, :nf], v[:, :nf])
            if isinstance(self.full, QuantizedFullBuffer):
                parts.append(self.full.attend(q_full, scale, memo=None if memos is None else memos["full"]))
            else:
                parts.append(self.full.attend(q_full, scale, causal=True))
        if self.budgeted is not None:
            self.budgeted.append(k[:, nf:], v[:, nf:])
            if isinstance(self.budgeted, QuantizedBudgetedBuffer):
                parts.append(self.budgeted.attend(q_budget, scale,
                                                   memo=None if memos is None else memos["budgeted"]))
            else:
                parts.append(self.budgeted.attend(q_budget, scale))
        self.length += 1
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts, dim=1) if parts else q.new_empty(q.shape)

    def reset(self) -> None:
        for buf in (self.full, self.budgeted):
            if buf is not None:
                buf.reset()
        self.length = 0

    def rows(self, start: int, stop: int) -> LayerKV:
        """Rows ``start .. stop - 1`` as views, with a host count of 0 (the caller sets it)."""
        return LayerKV(None if self.full is None else self.full.rows(start, stop),
                       None if self.budgeted is None else self.budgeted.rows(start, stop),
                       self.group_size, self.sliding_window)

    def copy_row(self, src: int, dst: int) -> None:
        for buf in (self.full, self.budgeted):
            if buf is not None:
                buf.copy_row(src, dst)

    @property
    def nbytes(self) -> int:
        return sum(buf.nbytes for buf in (self.full, self.budgeted) if buf is not None)


@dataclass
class StaticKVCache:
    """All layers' caches for one :class:`Plan`, allocated once (use :meth:`allocate`).

    ``seen`` (int64 ``[B]``, on the device) counts each row's tokens, the source of its next
    positions. Rows may hold sequences of different lengths (a slot pool's rows, views made by
    :meth:`rows`); the host-side ``length`` is then the longest row's, which the owner of the
    rows keeps (every layer's ``length``).
    """

    layers: list[LayerKV]
    plan: Plan
    batch: int
    max_context: int
    head_dim: int
    group_size: int
    dtype: torch.dtype
    device: torch.device
    seen: Tensor

    @classmethod
    def allocate(cls, plan: Plan, batch: int, max_context: int, head_dim: int,
                 group_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> StaticKVCache:
        device = torch.device(device) if device is not None else torch.device("cpu")
        layers = [LayerKV.allocate(lp, batch, max_context, head_dim, group_size, dtype, device)
                  for lp in plan.layers]
        seen = torch.zeros(batch, dtype=torch.int64, device=device)
        return cls(layers, plan, batch, max_context, head_dim, group_size, dtype, device, seen)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerKV:
        return self.layers[i]

    def __iter__(self) -> Iterator[LayerKV]:
        return iter(self.layers)

    @property
    def length(self) -> int:
        """Tokens seen (prompt + generated), as counted by the first layer."""
        return self.layers[0].length if self.layers else 0

    def positions(self, n_new: int) -> Tensor:
        """Positions ``[B, n_new]`` of each row's next tokens, computed on the device."""
        return self.seen[:, None] + torch.arange(n_new, device=self.seen.device)

    def rows(self, start: int, stop: int) -> StaticKVCache:
        """Rows ``start .. stop - 1`` as a cache of views (no copy): a slot pool decodes its
        active rows, or prefills one row, through it. Host counts start at 0: the caller sets
        each layer's ``length`` to what the rows hold (:meth:`set_length`)."""
        if not 0 <= start < stop <= self.batch:
            raise ValueError(f"rows {start}..{stop - 1} are not in the cache's {self.batch}")
        return StaticKVCache([layer.rows(start, stop) for layer in self.layers], self.plan,
                             stop - start, self.max_context, self.head_dim, self.group_size,
                             self.dtype, self.device, self.seen[start:stop])

    def set_length(self, length: int) -> None:
        """The host-side count every layer checks room against (the longest row's tokens)."""
        for layer in self.layers:
            layer.length = length

    def copy_row(self, src: int, dst: int) -> None:
        """Row ``src``'s whole state into row ``dst`` (a slot pool packing its rows)."""
        for layer in self.layers:
            layer.copy_row(src, dst)
        self.seen[dst].copy_(self.seen[src])

    def advance(self, n_new: int) -> None:
        """Count ``n_new`` tokens fed through every layer (device side)."""
        self.seen += n_new

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.seen.zero_()

    @property
    def nbytes(self) -> int:
        """All KV state (keys, values, codes, scales, biases, counters), equal to
        ``kvcompile.memory.plan_state_bytes(plan, d, max_context, itemsize) * B``."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def overhead_bytes(self) -> int:
        """The position counter ``seen``, not counted as KV memory."""
        return _nbytes(self.seen)
