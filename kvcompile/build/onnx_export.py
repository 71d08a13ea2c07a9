"""Export the source model as standard ONNX decoder graphs with a fixed-size KV cache.

This is the graph an inference team would get from any exporter, and the input of the ONNX
passes (``kvcompile.passes.onnx``): the uncompressed, unpermuted model, standard ops only
(opset 24), every layer's keys and values in a preallocated ``[B, Hkv, max_context, D]``
buffer that is a graph input and output. Two graphs:

* **prefill** — ``input_ids [B, T]`` (T dynamic) -> ``logits [B, V]`` of the last position and
  ``present_key.{i}`` / ``present_value.{i}``: the prompt's keys in slots ``0..T-1``, zeros
  after (``Pad``); one standard ``Attention`` node per layer (causal, or the model's sliding
  window as a mask).
* **decode** — ``input_ids [B, 1]``, ``past_length [B]`` (tokens already cached = the new
  token's position) and ``past_key.{i}`` / ``past_value.{i}`` -> ``logits [B, V]`` and the
  buffers with the new token written at slot ``past_length`` by ``TensorScatter`` (in place
  when the caller binds one buffer as input and output), attended by one ``Attention`` node
  over the whole buffer with a valid-length mask.

The export module reuses :class:`~kvcompile.runtime.model.CompactLM`'s own blocks, so the
graphs compute what the torch runtime computes; RoPE cos/sin are the runtime's tables, stored
as initializers and gathered per row.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvcompile.errors import ArtifactError
from kvcompile.runtime import onnx_io
from kvcompile.runtime.model import CompactLM

_FOLD_SIZE_LIMIT = 256  # constants up to this size are folded (shape arithmetic)


@dataclass
class SourceGraphs:
    """The two exported graphs (onnx-ir models), before any pass."""

    prefill: object  # onnx_ir.Model
    decode: object  # onnx_ir.Model
    max_context: int


class _SourceDecoder(nn.Module):
    """The source model as a fixed-size-cache decoder, written to be exported (see module doc).

    Registers the model's parameters under their checkpoint names (``model.layers.0...``),
    so the exported initializers keep them.
    """

    def __init__(self, lm: CompactLM, max_context: int, decode: bool) -> None:
        super().__init__()
        self.model = lm.model
        if not lm.arch.tie_embeddings:
            self.lm_head = lm.lm_head
        object.__setattr__(self, "_lm", lm)  # for its methods; its modules are registered above
        self.arch = lm.arch
        self.max_context = max_context
        self.decode = decode
        positions = torch.arange(max_context)
        tables = lm.rope_tables(positions, max_position=max_context - 1)
        self._table_of_layer: list[int] = []
        distinct: list[tuple[torch.Tensor, torch.Tensor]] = []  # layers with equal RoPE share
        for cos, sin in tables:
            match = next((j for j, (c, s) in enumerate(distinct)
                          if torch.equal(c, cos) and torch.equal(s, sin)), None)
            if match is None:
                match = len(distinct)
                distinct.append((cos, sin))
                self.register_buffer(f"rope_cos_{match}", cos.clone(), persistent=False)
                self.register_buffer(f"rope_sin_{match}", sin.clone(), persistent=False)
            self._table_of_layer.append(match)

    def _rope(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin rows per layer for ``positions`` ([T] or per row [B, T])."""
        gathered = {}
        for j in set(self._table_of_layer):
            cos, sin = getattr(self, f"rope_cos_{j}"), getattr(self, f"rope_sin_{j}")
            rows = (cos[positions], sin[positions])
            gathered[j] = rows if positions.dim() == 1 else (rows[0][:, None], rows[1][:, None])
        return [gathered[j] for j in self._table_of_layer]

    def forward(self, input_ids: torch.Tensor, *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        arch = self.arch
        t = input_ids.shape[1]
        size = self.max_context
        scale = arch.attention_scale
        gqa = {"enable_gqa": True} if arch.group_size > 1 else {}
        presents: list[torch.Tensor] = []
        if self.decode:
            past_length, cache = cache[0], cache[1:]
            positions = past_length[:, None] + torch.arange(t, device=input_ids.device)  # [B, T]
        else:
            positions = torch.arange(t, device=input_ids.device)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            window = arch.sliding_windows[i] or 0
            if self.decode:
                k_all = _write(cache[2 * i], k, past_length)
                v_all = _write(cache[2 * i + 1], v, past_length)
                presents.extend((k_all, v_all))
                keys = torch.arange(size, device=q.device)
                visible = keys[None, None, :] <= positions[:, :, None]  # [B, T, S]
                if window:
                    visible = visible & (keys[None, None, :] > positions[:, :, None] - window)
                return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=visible[:, None],
                                                      scale=scale, **gqa)
            presents.extend((F.pad(k, (0, 0, 0, size - t)), F.pad(v, (0, 0, 0, size - t))))
            if not window:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)
            keys = torch.arange(t, device=q.device)
            visible = (keys[None, :] <= keys[:, None]) & (keys[None, :] > keys[:, None] - window)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, **gqa)

        hidden = self._lm.hidden_states(input_ids, positions, attend, rope=self._rope(positions))
        return (self._lm.logits(hidden[:, -1]), *presents)


def _write(buffer: torch.Tensor, new: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``buffer`` with ``new [B, H, T, D]`` written at slots ``start[b]...`` of each row.

    Exported as one standard ``TensorScatter`` (opset 24): indexing by position would export
    as ScatterND between two Transposes, a copy of the whole cache every step.
    """
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic("TensorScatter", [buffer, new, start], {"axis": 2},
                                       dtype=buffer.dtype, shape=buffer.shape,
                                       version=onnx_io.OPSET)
    out = buffer.clone()
    rows = torch.arange(new.shape[0])[:, None]
    slots = start[:, None] + torch.arange(new.shape[2])
    out[rows, :, slots] = new.transpose(1, 2)
    return out


def _cache_names(n_layers: int, make) -> list[str]:
    return [make(kind, i) for i in range(n_layers) for kind in ("key", "value")]


def export_source(lm: CompactLM, max_context: int) -> SourceGraphs:
    """Export ``lm`` (float32, unpermuted) as the prefill and decode source graphs.

    ``max_context`` is the number of slots of every cache buffer (static in both graphs).
    """
    if lm.dtype != torch.float32:
        raise ArtifactError(f"the ONNX export needs float32 weights, got {lm.dtype}")
    arch = lm.arch
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=max_context)
    example_batch, example_seq = 2, 3
    ids = torch.zeros(example_batch, example_seq, dtype=torch.long)
    presents = _cache_names(arch.n_layers, onnx_io.source_present)
    prefill = _export(
        _SourceDecoder(lm, max_context, decode=False), (ids,),
        input_names=[onnx_io.INPUT_IDS], output_names=[onnx_io.LOGITS, *presents],
        dynamic_shapes=({0: batch, 1: seq},))
    cache = [torch.zeros(example_batch, arch.n_kv_heads, max_context, arch.head_dim)
             for _ in range(2 * arch.n_layers)]
    length = torch.full((example_batch,), 5, dtype=torch.long)
    decode = _export(
        _SourceDecoder(lm, max_context, decode=True), (ids[:, :1], length, *cache),
        input_names=[onnx_io.INPUT_IDS, onnx_io.PAST_LENGTH,
                     *_cache_names(arch.n_layers, onnx_io.source_past)],
        output_names=[onnx_io.LOGITS, *presents],
        dynamic_shapes=({0: batch}, ({0: batch}, *({0: batch} for _ in cache))))
    return SourceGraphs(prefill, decode, max_context)


def _export(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str],
            dynamic_shapes: tuple):
    """``torch.onnx.export(dynamo=True)``, quietly; shape arithmetic folded, weights untouched."""
    import onnxscript.optimizer

    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            module.eval(), args, dynamo=True, opset_version=onnx_io.OPSET, optimize=False,
            input_names=input_names, output_names=output_names, dynamic_shapes=dynamic_shapes,
            verbose=False)
        model = program.model
        # one round, no ONNX shape inference: folds the exporter's shape arithmetic in a
        # fraction of the default's time (the rewrites need no inferred shapes)
        onnxscript.optimizer.optimize_ir(model, num_iterations=1, onnx_shape_inference=False,
                                         input_size_limit=_FOLD_SIZE_LIMIT,
                                         output_size_limit=_FOLD_SIZE_LIMIT,
                                         should_fold=_keeps_weights)
    for value in model.graph.inputs:  # the exporter names the dynamic dim after the Dim
        if value.shape is not None and value.shape.rank() and not isinstance(value.shape[0], int):
            value.shape = type(value.shape)([onnx_io.BATCH, *value.shape[1:]])
    return model


def _keeps_weights(node) -> bool | None:
    """No folding of a node that reads a weight: ``Transpose(W)`` stays, so every weight
    keeps its checkpoint name and layout (the permutation pass looks them up by name)."""
    for value in node.inputs:
        tensor = None if value is None else value.const_value
        if tensor is not None and value.is_initializer() and tensor.size > _FOLD_SIZE_LIMIT:
            return False
    return None


@contextlib.contextmanager
def _quiet():
    """The exporter reports progress on stdout and warns about optional torchvision ops."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._dynamo", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
