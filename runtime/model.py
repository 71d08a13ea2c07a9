"""A compact decoder for the supported families, written for static-budget caches.

Owning the forward pass (instead of patching transformers) lets the profiler observe
post-RoPE q/k/v and the residual stream per layer, and lets the runtime hand every
cached attention to the kvcompile ops. Parameter names mirror transformers' checkpoints,
so a transformers state dict loads as is and the artifact stays a loadable checkpoint.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvcompile.arch import ArchSpec

# attend(layer_index, q, k, v) -> attention output [B, Hq, T, D]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# observe(layer_index, residual_in, q, k, v, attn_out) -> None  (profiling)
ObserveFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def exact_attention(arch: ArchSpec) -> AttendFn:
    """Uncompressed causal attention with the model's own sliding windows (no cache)."""
    from kvcompile.runtime.ops import budgeted_attention

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        window = arch.sliding_windows[layer] or 0
        return budgeted_attention(q, k, v, None, causal=True, window=window, scale=arch.attention_scale)

    return attend


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps = eps
        self.offset = offset  # Gemma scales by (1 + w), computed in fp32 before the cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.type_as(x)


def rope_inverse_frequencies(config: Any, arch: ArchSpec, layer: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scaling of one layer's RoPE (transformers' formulas)."""
    rope = arch.rope[layer]
    if rope.rope_type == "default":
        exponents = torch.arange(0, arch.head_dim, 2, dtype=torch.float) / arch.head_dim
        return 1.0 / (rope.theta**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope.rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported RoPE type {rope.rope_type!r}")
    layer_types = getattr(config, "layer_types", None)
    kwargs = {"layer_type": layer_types[layer]} if layer_types and isinstance(
        getattr(config, "rope_parameters", None), dict
    ) and layer_types[layer] in config.rope_parameters else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope.rope_type](config, None, **kwargs)
    return inv_freq.float(), float(scaling)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, arch: ArchSpec, bias: dict[str, bool]) -> None:
        super().__init__()
        q_out = arch.n_heads * arch.head_dim
        kv_out = arch.n_kv_heads * arch.head_dim
        self.q_proj = nn.Linear(arch.hidden_size, q_out, bias=bias["q"])
        self.k_proj = nn.Linear(arch.hidden_size, kv_out, bias=bias["k"])
        self.v_proj = nn.Linear(arch.hidden_size, kv_out, bias=bias["v"])
        self.o_proj = nn.Linear(q_out, arch.hidden_size, bias=bias["o"])
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_eps, arch.gemma_norms)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_eps, arch.gemma_norms)
        self.arch = arch

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (after RoPE) and v, each [B, H, T, D]."""
        b, t, _ = x.shape
        d = self.arch.head_dim
        q = self.q_proj(x).view(b, t, -1, d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, d).transpose(1, 2)
        if self.arch.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return rotate(q, cos, sin), rotate(k, cos, sin), v


class MLP(nn.Module):
    def __init__(self, arch: ArchSpec, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=bias)
        if arch.activation not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {arch.activation!r}")
        self.act = _ACTIVATIONS[arch.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, arch: ArchSpec, bias: dict[str, bool]) -> None:
        super().__init__()
        norm = lambda: RMSNorm(arch.hidden_size, arch.rms_eps, arch.gemma_norms)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(arch, bias)
        self.post_attention_layernorm = norm()
        if arch.gemma_norms:  # sandwich norms around both sub-blocks
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(arch, bias["mlp"])
        self.gemma = arch.gemma_norms


class Backbone(nn.Module):
    def __init__(self, arch: ArchSpec, bias: dict[str, bool]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(Block(arch, bias) for _ in range(arch.n_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_eps, arch.gemma_norms)


class CompactLM(nn.Module):
    """Decoder-only LM whose attention is supplied by the caller (``attend``)."""

    def __init__(self, arch: ArchSpec, config: Any, bias: dict[str, bool]) -> None:
        super().__init__()
        self.arch = arch
        self.model = Backbone(arch, bias)
        if not arch.tie_embeddings:
            self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        self._rope: list[tuple[torch.Tensor, float]] = [
            rope_inverse_frequencies(config, arch, i) for i in range(arch.n_layers)
        ]

    @classmethod
    def from_state_dict(
        cls, arch: ArchSpec, config: Any, state: dict[str, torch.Tensor]
    ) -> CompactLM:
        prefix = "model.layers.0."
        bias = {
            "q": prefix + "self_attn.q_proj.bias" in state,
            "k": prefix + "self_attn.k_proj.bias" in state,
            "v": prefix + "self_attn.v_proj.bias" in state,
            "o": prefix + "self_attn.o_proj.bias" in state,
            "mlp": prefix + "mlp.gate_proj.bias" in state,
        }
        with torch.device("meta"):
            model = cls(arch, config, bias)
        wanted = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        if arch.tie_embeddings:
            wanted.pop("lm_head.weight", None)
        model.load_state_dict(wanted, strict=True, assign=True)
        model._rope = [rope_inverse_frequencies(config, arch, i) for i in range(arch.n_layers)]
        return model.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def rope_tables(self, positions: torch.Tensor, max_position: int | None = None
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin per layer for ``positions`` [T] (every row) or [B, T] (per row: the tables
        are then ``[B, 1, T, D]``, broadcasting over heads); layers sharing a RoPE share them.

        Rows are gathered from per-RoPE tables over ``0..max_position``, computed once on the
        model's device and grown geometrically (the values are elementwise in the position,
        so a row of the table equals computing that position alone; decoding then costs one
        gather, not a recompute). ``max_position`` (a host-side bound) spares reading
        ``positions`` back, which on a GPU would be a synchronisation.
        """
        if (positions.is_floating_point() or type(positions) is not torch.Tensor
                or torch.compiler.is_compiling() or torch.jit.is_tracing()):
            return self._rope_tables_direct(positions)  # no data-dependent table size
        if max_position is None:
            if positions.numel() and int(positions.min()) < 0:
                return self._rope_tables_direct(positions)
            max_position = int(positions.max()) if positions.numel() else -1
        shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        tables = []
        for inv_freq, scaling in self._rope:
            key = id(inv_freq)
            if key not in shared:
                cos, sin = self._rope_rows(inv_freq, scaling, max_position + 1)
                idx = positions.to(cos.device)
                if idx.dim() == 1:
                    shared[key] = (cos.index_select(0, idx), sin.index_select(0, idx))
                else:  # [B, T] -> [B, 1, T, D]: the same rows, one table per sequence
                    shared[key] = (cos[idx].unsqueeze(1), sin[idx].unsqueeze(1))
            tables.append(shared[key])
        return tables

    def _rope_tables_direct(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same tables computed for ``positions`` alone (tracing, float positions)."""
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        tables = []
        for inv_freq, scaling in self._rope:
            key = id(inv_freq)
            if key not in cache:
                freqs = positions.float()[..., None] * inv_freq.to(positions.device)
                emb = torch.cat((freqs, freqs), dim=-1)
                if positions.dim() == 2:
                    emb = emb.unsqueeze(1)  # [B, 1, T, D]
                cache[key] = (
                    (emb.cos() * scaling).to(self.dtype),
                    (emb.sin() * scaling).to(self.dtype),
                )
            tables.append(cache[key])
        return tables

    def _rope_rows(self, inv_freq: torch.Tensor, scaling: float,
                   needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached ``[N, D]`` cos/sin table of one RoPE, with ``N >= needed`` rows.

        The table only ever grows; a replaced table is kept alive (geometric growth: a few of
        them at most), so a captured CUDA graph that gathers from it never reads freed memory.
        """
        cache = self.__dict__.setdefault("_rope_cache", {})
        key = id(inv_freq)
        entry = cache.get(key)
        device = self.device
        fresh = (entry is not None and entry[0] is inv_freq and entry[1] == self.dtype
                 and entry[2].device == device)
        if not fresh or entry[2].shape[0] < needed:
            rows = max(needed, 256, 2 * entry[2].shape[0] if fresh else 0)
            positions = torch.arange(rows, device=device).float()[:, None]
            freqs = positions * inv_freq.to(device)[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            if entry is not None:
                self.__dict__.setdefault("_rope_retired", []).append(entry)
            entry = (inv_freq, self.dtype, (emb.cos() * scaling).to(self.dtype),
                     (emb.sin() * scaling).to(self.dtype))
            cache[key] = entry
        return entry[2], entry[3]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self.arch.gemma_norms:
            x = x * torch.tensor(math.sqrt(self.arch.hidden_size), dtype=x.dtype)
        return x

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attend: AttendFn,
        observe: ObserveFn | None = None,
        start_layer: int = 0,
        start_hidden: torch.Tensor | None = None,
        max_position: int | None = None,
        rope: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Run the blocks; ``attend`` decides what each attention sees (cache or not).

        ``start_layer`` with ``start_hidden`` (the residual stream entering that block) skips
        the blocks below it, for callers that replay only the top of the network.
        ``max_position`` bounds ``positions`` (see :meth:`rope_tables`). ``rope`` (cos/sin per
        layer, broadcastable against ``[B, H, T, D]``) replaces the tables for callers that
        gather them per row themselves (the ONNX export). Inputs are moved to the model's device.
        """
        if start_layer and start_hidden is None:
            raise ValueError("start_layer needs start_hidden, the residual stream entering that block")
        device = self.device
        x = self.embed(input_ids.to(device)) if start_hidden is None else start_hidden
        tables = rope if rope is not None else self.rope_tables(positions.to(device), max_position)
        b, t, _ = x.shape
        for i, block in enumerate(self.model.layers):
            if i < start_layer:
                continue
            h = block.input_layernorm(x)
            q, k, v = block.self_attn.project(h, *tables[i])
            attn = attend(i, q, k, v)
            if observe is not None:
                observe(i, x, q, k, v, attn)
            attn = block.self_attn.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
            if block.gemma:
                x = x + block.post_attention_layernorm(attn)
                x = x + block.post_feedforward_layernorm(
                    block.mlp(block.pre_feedforward_layernorm(x))
                )
            else:
                x = x + attn
                x = x + block.mlp(block.post_attention_layernorm(x))
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.model.norm(hidden)
        weight = self.model.embed_tokens.weight if self.arch.tie_embeddings else self.lm_head.weight
        out = F.linear(h, weight)
        if self.arch.final_softcap:
            out = torch.tanh(out / self.arch.final_softcap) * self.arch.final_softcap
        return out

    def o_proj_weight(self, layer: int) -> torch.Tensor:
        return self.model.layers[layer].self_attn.o_proj.weight
