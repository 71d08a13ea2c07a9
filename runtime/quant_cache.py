"""Head groups whose keys and values are stored as codes (docs/DESIGN.md, "Quantized storage").

Two buffers with the interface of :class:`~kvcompile.runtime.cache.FullBuffer` and
:class:`~kvcompile.runtime.cache.BudgetedBuffer`, chosen by ``LayerKV.allocate`` from the
plan's ``full_storage`` / ``budget_storage``:

* :class:`QuantizedFullBuffer`: a quantized body of whole token groups plus a full-precision
  residual ring of one group, flushed into the body a group at a time
  (:func:`~kvcompile.runtime.quant_ops.quantized_append`);
* :class:`QuantizedBudgetedBuffer`: the selected slots as codes, written once when the prompt
  is compressed; sinks, compensation and the window stay a full-precision budgeted buffer of
  layout ``(s, c, 0, w)``, so decode runs the unchanged ``budgeted_cache_update`` on them and
  a token leaving the window is folded into the compensation slot (never quantized).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from kvcompile.memory import body_tokens, code_bytes, residual_tokens, scale_groups
from kvcompile.plan import BudgetLayout, Storage

from .quant import SCALE_DTYPE, Quantized, quantize_keys, quantize_values
from .quant_ops import DequantMemo, quantized_append, quantized_attention

__all__ = ["QuantizedBudgetedBuffer", "QuantizedFullBuffer", "empty_codes"]


def empty_codes(batch: int, heads: int, tokens: int, key_groups: int, head_dim: int,
                storage: Storage, device: torch.device | str | None
                ) -> tuple[Quantized, Quantized]:
    """Zeroed key and value storage for ``tokens`` slots (``key_groups`` token groups)."""
    def zeros(*shape: int, dtype: torch.dtype = SCALE_DTYPE) -> Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)

    value_groups = scale_groups(head_dim, storage.group)
    keys = Quantized(zeros(batch, heads, tokens, code_bytes(head_dim, storage.key_bits),
                           dtype=torch.uint8),
                     zeros(batch, heads, key_groups, head_dim), zeros(batch, heads, key_groups, head_dim))
    values = Quantized(zeros(batch, heads, tokens, code_bytes(head_dim, storage.value_bits),
                             dtype=torch.uint8),
                       zeros(batch, heads, tokens, value_groups), zeros(batch, heads, tokens, value_groups))
    return keys, values


def _write_codes(dst: Quantized, src: Quantized, tokens: int) -> None:
    """``src`` (quantized from the first ``tokens`` slots) into the start of ``dst``."""
    dst.codes[:, :, :tokens] = src.codes
    dst.scale[:, :, :src.scale.shape[2]] = src.scale
    dst.zero[:, :, :src.zero.shape[2]] = src.zero


def _row_tensors(obj: object) -> list[Tensor]:
    out: list[Tensor] = []
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if isinstance(value, Tensor):
            out.append(value)
        elif isinstance(value, Quantized):
            out.extend((value.codes, value.scale, value.zero))
    return out


def _quantized_rows(q: Quantized, start: int, stop: int) -> Quantized:
    return Quantized(q.codes[start:stop], q.scale[start:stop], q.zero[start:stop])


@dataclass
class QuantizedFullBuffer:
    """Full heads: body codes for ``n_groups * group`` tokens + a residual ring ``[B, H, R, D]``.

    ``length`` (int64 ``[B]``) counts each row's tokens: the first ``length - length % group``
    are in the body, the rest in residual slots ``0 .. length % group - 1``.
    """

    keys: Quantized
    values: Quantized
    k_res: Tensor
    v_res: Tensor
    length: Tensor
    storage: Storage
    capacity: int  # max_context

    @classmethod
    def empty(cls, batch: int, heads: int, max_context: int, head_dim: int, storage: Storage,
              dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> QuantizedFullBuffer:
        body = body_tokens(storage, max_context)
        keys, values = empty_codes(batch, heads, body, body // storage.group, head_dim, storage,
                                   device)
        shape = (batch, heads, residual_tokens(storage, max_context), head_dim)
        return cls(keys, values, torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(batch, dtype=torch.int64, device=device), storage, max_context)

    @property
    def max_context(self) -> int:
        return self.capacity

    @property
    def dtype(self) -> torch.dtype:
        return self.k_res.dtype

    def fill(self, k: Tensor, v: Tensor) -> None:
        """A prompt ``[B, H, L, D]`` into the empty buffer: its whole groups quantized at once,
        the rest into the residual ring (the state appending it token by token leaves)."""
        n_new = k.shape[2]
        g = self.storage.group
        body = (n_new // g) * g
        if body:
            _write_codes(self.keys, quantize_keys(k[:, :, :body], self.storage.key_bits, g), body)
            _write_codes(self.values, quantize_values(v[:, :, :body], self.storage.value_bits, g),
                         body)
        rest = n_new - body
        self.k_res[:, :, :rest] = k[:, :, body:]
        self.v_res[:, :, :rest] = v[:, :, body:]
        self.length += n_new

    def write(self, k: Tensor, v: Tensor) -> None:
        """Append ``T`` tokens ``[B, H, T, D]`` one by one through the flush rule."""
        for t in range(k.shape[2]):
            quantized_append(self.keys, self.values, self.k_res, self.v_res, self.length,
                             k[:, :, t:t + 1], v[:, :, t:t + 1], key_bits=self.storage.key_bits,
                             value_bits=self.storage.value_bits, group=self.storage.group)

    def attend(self, q: Tensor, scale: float | None = None, causal: bool = True,
               memo: DequantMemo | None = None) -> Tensor:
        """Decode attention (``q`` holds one query per row, the newest token)."""
        g = self.storage.group
        in_ring = torch.remainder(self.length, g)
        return quantized_attention(q, self.keys, self.values, self.length - in_ring, self.k_res,
                                   self.v_res, fp_length=in_ring, key_bits=self.storage.key_bits,
                                   value_bits=self.storage.value_bits, group=g, scale=scale,
                                   memo=memo)

    def reset(self) -> None:
        self.length.zero_()

    def rows(self, start: int, stop: int) -> QuantizedFullBuffer:
        return replace(self, keys=_quantized_rows(self.keys, start, stop),
                       values=_quantized_rows(self.values, start, stop),
                       k_res=self.k_res[start:stop], v_res=self.v_res[start:stop],
                       length=self.length[start:stop])

    def copy_row(self, src: int, dst: int) -> None:
        for t in _row_tensors(self):
            t[dst].copy_(t[src])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in _row_tensors(self))


@dataclass
class QuantizedBudgetedBuffer:
    """Budgeted heads with quantized selected slots: ``fp`` holds sinks, compensation and the
    window (layout ``(s, c, 0, w)``), ``keys`` / ``values`` the ``h`` selected slots, of which
    row ``b`` fills the first ``selected_length[b]`` when its prompt is compressed."""

    fp: object  # BudgetedBuffer (runtime.cache imports this module)
    keys: Quantized
    values: Quantized
    selected_length: Tensor
    layout: BudgetLayout
    storage: Storage

    @classmethod
    def empty(cls, batch: int, heads: int, head_dim: int, layout: BudgetLayout, storage: Storage,
              dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> QuantizedBudgetedBuffer:
        from .cache import BudgetedBuffer

        fp = BudgetedBuffer.empty(batch, heads, head_dim, replace(layout, selected=0), dtype, device)
        keys, values = empty_codes(batch, heads, layout.selected,
                                   scale_groups(layout.selected, storage.group), head_dim, storage,
                                   device)
        return cls(fp, keys, values, torch.zeros(batch, dtype=torch.int64, device=device), layout,
                   storage)

    def compress(self, k: Tensor, v: Tensor, scores: Tensor | None) -> None:
        """The prompt's ``k, v [B, H, L, D]`` compressed as ``compress_prefill`` does, then the
        selected tokens quantized (once) and the rest moved into the full-precision part."""
        from .cache import BudgetedBuffer, compress_prefill

        lay = self.layout
        b, heads, _, d = k.shape
        staged = compress_prefill(k, v, scores, lay,
                                  out=BudgetedBuffer.empty(b, heads, d, lay, k.dtype, k.device))
        head, sel = lay.sinks + lay.compensation, lay.selected
        fp = self.fp
        for dst, src in ((fp.k, staged.k), (fp.v, staged.v), (fp.bias, staged.bias)):
            dst[:, :, :head] = src[:, :, :head]
            dst[:, :, head:] = src[:, :, head + sel:]
        fp.counters.copy_(staged.counters)
        fp.counters[:, 2] = 0  # no selected slots in the full-precision part
        n_sel = int(staged.counters[0, 2])
        self.keys.codes.zero_()
        self.values.codes.zero_()
        if n_sel:
            g = self.storage.group
            _write_codes(self.keys, quantize_keys(staged.k[:, :, head:head + n_sel],
                                                  self.storage.key_bits, g), n_sel)
            _write_codes(self.values, quantize_values(staged.v[:, :, head:head + n_sel],
                                                      self.storage.value_bits, g), n_sel)
        self.selected_length.fill_(n_sel)

    def append(self, k_new: Tensor, v_new: Tensor) -> None:
        self.fp.append(k_new, v_new)

    def attend(self, q: Tensor, scale: float | None = None,
               memo: DequantMemo | None = None) -> Tensor:
        return quantized_attention(q, self.keys, self.values, self.selected_length, self.fp.k,
                                   self.fp.v, fp_bias=self.fp.bias,
                                   key_bits=self.storage.key_bits,
                                   value_bits=self.storage.value_bits, group=self.storage.group,
                                   scale=scale, memo=memo)

    def reset(self) -> None:
        self.fp.reset()
        self.selected_length.zero_()

    def rows(self, start: int, stop: int) -> QuantizedBudgetedBuffer:
        return replace(self, fp=self.fp.rows(start, stop),
                       keys=_quantized_rows(self.keys, start, stop),
                       values=_quantized_rows(self.values, start, stop),
                       selected_length=self.selected_length[start:stop])

    def copy_row(self, src: int, dst: int) -> None:
        self.fp.copy_row(src, dst)
        for t in _row_tensors(self):
            t[dst].copy_(t[src])

    @property
    def nbytes(self) -> int:
        return self.fp.nbytes + sum(t.numel() * t.element_size() for t in _row_tensors(self))
