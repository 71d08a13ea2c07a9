"""End-to-end layer sensitivity: what the answer loses when one layer's context shrinks.

The error curves (``profiler``) are local: each head's output error relative to its own
layer's residual norm. They cannot see that a layer's heads, cut to a short window, stop
carrying a needle 500 tokens back into the question, even when no single head attends to
it much. This stage measures that directly, under the serving protocol: the context of a
needle probe is prefilled exactly and compressed by the runtime's own ``compress_prefill``;
the question and answer then run over the compressed context. Starting from a reference
state (retrieval heads full, every other head at ``reference_capacity``), one layer at a
time gets each capacity of the grid, and the teacher-forced answer NLL is recorded.

Only the question tokens are recomputed per state (the context's K/V never change), from
the changed layer up, so the whole grid costs a few hundred short passes per probe. The
question's tokens all stay visible to each other; in the runtime they enter the window and
push out its oldest tokens, a small difference for a ~20-token question against windows of
100 slots and more.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvcompile.metrics import log_probs, nll
from kvcompile.profile.calibration import CalibPrompt
from kvcompile.profile.statistics import ProfileSettings
from kvcompile.runtime.cache import compress_prefill, selection_scores
from kvcompile.runtime.model import CompactLM, exact_attention
from kvcompile.runtime.ops import budgeted_attention
from kvcompile.settings import FitSettings

FULL = 0  # capacity marker: the layer's budgeted heads keep the whole context


@dataclass(frozen=True)
class SensitivitySettings:
    # every budgeted head's capacity in the reference state
    reference_capacity: int = ProfileSettings.answer_reference
    # the compressed heads' layouts and selection, as the fit builds them (``fit.layout``)
    fit: FitSettings = FitSettings()


@dataclass
class _LayerContext:
    """One layer's context K/V: exact for full heads, compressed per capacity for the rest."""

    k: torch.Tensor  # [1, Hkv, L, D]
    v: torch.Tensor
    scores: torch.Tensor  # selection scores [1, Hkv, L]
    compressed: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class _ProbeRun:
    """A needle probe's exact context, replayable under any per-layer capacity state."""

    def __init__(self, model: CompactLM, prompt: CalibPrompt, settings: SensitivitySettings,
                 full_heads: set[tuple[int, int]]) -> None:
        self.model = model
        self.settings = settings
        arch = model.arch
        self.arch = arch
        n_ctx = prompt.context_length
        device = model.device
        ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=device)
        self.suffix = ids[:, n_ctx:]
        self.positions = torch.arange(n_ctx, ids.shape[1], device=device)
        self.answer_rows = torch.tensor([p - n_ctx for p in prompt.answer_positions], dtype=torch.long,
                                        device=device)
        self.targets = ids[0, torch.tensor(prompt.answer_positions, device=device) + 1]
        self.full = [[h for h in range(arch.n_kv_heads) if (layer, h) in full_heads]
                     for layer in range(arch.n_layers)]
        self.budgeted = [[h for h in range(arch.n_kv_heads) if (layer, h) not in full_heads]
                         for layer in range(arch.n_layers)]
        self.layers: list[_LayerContext] = []
        self.n_ctx = n_ctx

        selection = settings.fit.selection

        def record(layer: int, residual, q, k, v, attn) -> None:  # noqa: ANN001 - tensors
            scores = selection_scores(q, k, arch.attention_scale, selection.rule, selection.observation_window)
            self.layers.append(_LayerContext(k, v, scores, {}))

        with torch.no_grad():
            model.hidden_states(ids[:, :n_ctx], torch.arange(n_ctx, device=device), exact_attention(arch),
                                observe=record)

    def _context(self, layer: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K, V, bias of layer ``layer``'s context with its budgeted heads at ``capacity``."""
        ctx = self.layers[layer]
        if capacity == FULL or capacity >= self.n_ctx:
            capacity = FULL
        if capacity not in ctx.compressed:
            heads = self.budgeted[layer]
            if capacity == FULL or not heads:
                k, v = ctx.k, ctx.v
                bias = k.new_zeros(k.shape[:3], dtype=torch.float32)
            else:
                buf = compress_prefill(ctx.k[:, heads], ctx.v[:, heads], ctx.scores[:, heads],
                                       self.settings.fit.layout(capacity))
                full = self.full[layer]
                n = max(self.n_ctx if full else 0, buf.k.shape[2])
                shape = (1, self.arch.n_kv_heads, n, ctx.k.shape[-1])
                k, v = ctx.k.new_zeros(shape), ctx.k.new_zeros(shape)
                bias = ctx.k.new_full(shape[:3], float("-inf"), dtype=torch.float32)
                k[:, heads, : buf.k.shape[2]], v[:, heads, : buf.k.shape[2]] = buf.k, buf.v
                bias[:, heads, : buf.k.shape[2]] = buf.bias
                if full:
                    k[:, full, : self.n_ctx], v[:, full, : self.n_ctx] = ctx.k[:, full], ctx.v[:, full]
                    bias[:, full, : self.n_ctx] = 0.0
            ctx.compressed[capacity] = (k, v, bias)
        return ctx.compressed[capacity]

    def answer_nll(self, capacities: Sequence[int], start_layer: int = 0,
                   start_hidden: torch.Tensor | None = None,
                   entries: list[torch.Tensor] | None = None) -> float:
        """Mean NLL of the answer tokens with layer ``i``'s budgeted heads at ``capacities[i]``.

        ``start_layer``/``start_hidden`` replay from a block whose input is known (the state
        below it is unchanged); ``entries`` collects every block's input for later replays.
        """
        arch = self.arch

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            ck, cv, cbias = self._context(layer, capacities[layer])
            bias = torch.cat([cbias, cbias.new_zeros(k.shape[:3])], dim=2)
            window = arch.sliding_windows[layer] or 0  # sliding layers always see their full context
            return budgeted_attention(q, torch.cat([ck, k], 2), torch.cat([cv, v], 2), bias,
                                      causal=True, window=window, scale=arch.attention_scale)

        def keep(layer: int, residual, q, k, v, attn) -> None:  # noqa: ANN001 - tensors
            entries.append(residual)

        with torch.no_grad():
            hidden = self.model.hidden_states(self.suffix, self.positions, attend,
                                              observe=keep if entries is not None else None,
                                              start_layer=start_layer, start_hidden=start_hidden)
            logits = self.model.logits(hidden[:, self.answer_rows])[0]
        return nll(log_probs(logits), self.targets)


def answer_probes(prompts: Sequence[CalibPrompt]) -> list[CalibPrompt]:
    """The prompts this stage replays: a compressed context followed by scored answer tokens."""
    return [p for p in prompts if p.context_length and p.answer_positions]


def layer_sensitivity(
    model: CompactLM,
    prompts: Sequence[CalibPrompt],
    full_heads: set[tuple[int, int]],
    capacity_grid: Sequence[int],
    settings: SensitivitySettings = SensitivitySettings(),
    progress: Callable[[CalibPrompt], None] | None = None,
) -> torch.Tensor:
    """Answer-NLL increase ``[layers, grid]`` of one layer at each capacity, all else at reference.

    Entry ``[l, c]`` is NLL(layer ``l`` at ``c``) - NLL(layer ``l`` full), both with every other
    layer in the reference state, averaged over the needle probes; made non-negative and
    non-increasing in the capacity. Layers without budgeted heads (or sliding) are zero.
    """
    arch = model.arch
    probes = answer_probes(prompts)
    curves = torch.zeros(arch.n_layers, len(capacity_grid), dtype=torch.float64)
    if not probes:
        return curves.float()
    reference = [FULL if arch.sliding_windows[i] else settings.reference_capacity for i in range(arch.n_layers)]
    smallest = settings.fit.sinks + settings.fit.compensation + 1  # a layout needs one window slot
    capacities = [max(c, smallest) for c in capacity_grid]
    for prompt in probes:
        run = _ProbeRun(model, prompt, settings, full_heads)
        entries: list[torch.Tensor] = []  # block inputs in the reference state
        reference_nll = run.answer_nll(reference, entries=entries)
        for layer in range(arch.n_layers):
            if arch.sliding_windows[layer] or not run.budgeted[layer]:
                continue
            state = list(reference)
            state[layer] = FULL
            baseline = run.answer_nll(state, layer, entries[layer])
            for ci, capacity in enumerate(capacities):
                if capacity >= run.n_ctx:
                    continue  # nothing evicted: no loss
                if capacity == settings.reference_capacity:
                    nll = reference_nll
                else:
                    state[layer] = capacity
                    nll = run.answer_nll(state, layer, entries[layer])
                curves[layer, ci] += nll - baseline
        if progress is not None:
            progress(prompt)
    curves /= len(probes)
    curves = torch.cummin(curves.clamp_min(0.0), dim=-1).values
    return curves.float()
