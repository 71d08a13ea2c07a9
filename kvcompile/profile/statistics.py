"""Per-KV-head statistics from calibration prompts, streamed layer by layer.

Only decode-like queries are scored (the last positions of each prompt, the answer
positions of probes, a sample of the repeated block), so a layer never holds more than a
``queries x L`` attention map per head, and nothing survives a layer but running sums.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvcompile.profile.calibration import CalibPrompt
from kvcompile.runtime.model import CompactLM, exact_attention
from kvcompile.settings import FitSettings

DEFAULT_GRID = (16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass(frozen=True)
class ProfileSettings:
    capacity_grid: tuple[int, ...] = DEFAULT_GRID
    sinks: int = FitSettings.sinks  # sink slots of the layout the error curves score: the fit's
    last_queries: int = 32  # decode-like queries at the end of every prompt
    repeat_queries: int = 128  # sampled queries in the repeats of the random block
    local_window: int = 64  # "local mass": attention on the last tokens before the query
    answer_reference: int = 256  # capacity of the other layers while one layer's answer loss is measured; 0: skip


@dataclass
class HeadAccumulator:
    """Running sums for every (layer, KV head); divided out in ``finish``."""

    n_layers: int
    n_kv: int
    n_caps: int

    def __post_init__(self) -> None:
        shape = (self.n_layers, self.n_kv)
        self.sums = {name: torch.zeros(shape, dtype=torch.float64) for name in STAT_NAMES}
        self.counts = {name: torch.zeros(shape, dtype=torch.float64) for name in STAT_NAMES}
        self.error_sum = torch.zeros((*shape, self.n_caps), dtype=torch.float64)
        self.error_count = torch.zeros(shape, dtype=torch.float64)

    def add(self, name: str, layer: int, values: torch.Tensor, count: int) -> None:
        """``values`` [n_kv] (any device): sums over ``count`` queries."""
        self.sums[name][layer] += values.detach().to("cpu", torch.float64)
        self.counts[name][layer] += count


STAT_NAMES = ("induction", "echo", "needle", "sink_mass", "local_mass", "entropy")


@dataclass
class HeadStatistics:
    """Final per-head statistics, arrays shaped [layers, kv_heads] (error: [..., grid])."""

    capacity_grid: tuple[int, ...]
    induction: torch.Tensor
    echo: torch.Tensor
    needle: torch.Tensor
    sink_mass: torch.Tensor
    local_mass: torch.Tensor
    entropy: torch.Tensor
    error: torch.Tensor
    # end-to-end answer-NLL increase per layer over the grid (``sensitivity``); None: not measured
    layer_loss: torch.Tensor | None = None
    layer_loss_full: frozenset[tuple[int, int]] = frozenset()  # heads kept full while it was measured
    retrieval: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.retrieval = retrieval_score(self.induction, self.echo, self.needle)


def retrieval_score(induction: torch.Tensor, echo: torch.Tensor, needle: torch.Tensor) -> torch.Tensor:
    """One number per head: how much it fetches far context by content.

    Each signal is normalised by its maximum over heads so that none dominates by scale;
    the needle mass at answer positions is the most direct evidence, induction the most
    data-free, echo catches copy heads (RazorAttention keeps those too).
    """

    def normalised(x: torch.Tensor) -> torch.Tensor:
        top = float(x.max())
        return x / top if top > 0 else x

    return 0.4 * normalised(needle) + 0.4 * normalised(induction) + 0.2 * normalised(echo)


def _query_positions(prompt: CalibPrompt, settings: ProfileSettings) -> torch.Tensor:
    length = len(prompt.input_ids)
    chosen = set(range(max(0, length - settings.last_queries), length))
    chosen.update(p for p in prompt.answer_positions if p < length)
    if prompt.kind == "repeat" and prompt.repeat_period:
        first = prompt.repeat_start + prompt.repeat_period
        span = length - first
        if span > 0:
            step = max(1, span // settings.repeat_queries)
            chosen.update(range(first, length, step))
    return torch.tensor(sorted(chosen), dtype=torch.long)


class PromptObserver:
    """Scores one prompt; called by the model after each layer's attention."""

    def __init__(
        self,
        prompt: CalibPrompt,
        model: CompactLM,
        acc: HeadAccumulator,
        settings: ProfileSettings,
    ) -> None:
        self.prompt = prompt
        self.model = model
        self.acc = acc
        self.settings = settings
        self.positions = _query_positions(prompt, settings)
        arch = model.arch
        self.group = arch.group_size
        self.scale = arch.attention_scale
        self.answer_mask = torch.isin(self.positions, torch.tensor(prompt.answer_positions, dtype=torch.long))
        length = len(prompt.input_ids)
        self.needle = torch.zeros(length, dtype=torch.bool)
        for start, end in prompt.needle_spans:
            self.needle[start:end] = True

    def __call__(
        self,
        layer: int,
        residual: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_out: torch.Tensor,
    ) -> None:
        with torch.no_grad():
            self._observe(layer, residual[0], q[0], k[0], v[0])

    def _on(self, device: torch.device) -> None:
        """Move the prompt's index tensors to the model's device (once per prompt)."""
        if self.positions.device != device:
            self.positions = self.positions.to(device)
            self.answer_mask = self.answer_mask.to(device)
            self.needle = self.needle.to(device)

    def _observe(self, layer, residual, q, k, v) -> None:  # noqa: ANN001 - tensors
        arch = self.model.arch
        self._on(q.device)
        pos = self.positions
        n_kv, length, d = k.shape
        g = self.group
        qp = q[:, pos].float()  # [Hq, P, D]
        kf = k.float()
        logits = torch.einsum("hpd,hld->hpl", qp, kf.repeat_interleave(g, 0)) * self.scale
        key_index = torch.arange(length, device=k.device)
        future = key_index[None, :] > pos[:, None]  # causal
        window = arch.sliding_windows[layer]
        if window:
            future |= key_index[None, :] <= pos[:, None] - window
        logits = logits.masked_fill(future[None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # [Hq, P, L]
        self._mass_stats(layer, probs)
        self._retrieval_stats(layer, probs)
        if not window:  # sliding layers keep the model's own window: nothing to score
            self._error_curve(layer, residual, qp, kf, v.float(), logits, probs)

    def _group_max(self, per_query_head: torch.Tensor) -> torch.Tensor:
        return per_query_head.view(-1, self.group).max(dim=1).values

    def _group_mean(self, per_query_head: torch.Tensor) -> torch.Tensor:
        return per_query_head.view(-1, self.group).mean(dim=1)

    def _mass_stats(self, layer: int, probs: torch.Tensor) -> None:
        s = self.settings
        pos = self.positions
        count = len(pos)
        key_index = torch.arange(probs.shape[-1], device=probs.device)
        sink = probs[..., : s.sinks].sum(-1)  # [Hq, P]
        local = ((key_index[None, :] > pos[:, None] - s.local_window) & (key_index[None, :] <= pos[:, None]))
        local_mass = (probs * local[None]).sum(-1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        self.acc.add("sink_mass", layer, self._group_mean(sink.sum(1)), count)
        self.acc.add("local_mass", layer, self._group_mean(local_mass.sum(1)), count)
        self.acc.add("entropy", layer, self._group_mean(entropy.sum(1)), count)

    def _retrieval_stats(self, layer: int, probs: torch.Tensor) -> None:
        prompt = self.prompt
        if prompt.needle_spans and bool(self.answer_mask.any()):
            mass = (probs[:, self.answer_mask] * self.needle[None, None, :]).sum(-1)  # [Hq, A]
            self.acc.add("needle", layer, self._group_max(mass.sum(1)), int(self.answer_mask.sum()))
        period = prompt.repeat_period
        if prompt.kind == "repeat" and period:
            pos = self.positions
            in_repeat = pos >= prompt.repeat_start + period
            if bool(in_repeat.any()):
                p = pos[in_repeat]
                rows = probs[:, in_repeat]  # [Hq, R, L]
                induction = rows.new_zeros(rows.shape[:2])
                echo = rows.new_zeros(rows.shape[:2])
                m = 1
                while True:
                    earlier = p - m * period
                    valid = earlier >= prompt.repeat_start
                    if not bool(valid.any()):
                        break
                    idx = earlier.clamp_min(0)
                    echo += rows.gather(2, idx[None, :, None].expand(rows.shape[0], -1, 1))[..., 0] * valid
                    nxt = (idx + 1).clamp_max(rows.shape[-1] - 1)
                    induction += rows.gather(2, nxt[None, :, None].expand(rows.shape[0], -1, 1))[..., 0] * valid
                    m += 1
                n = int(in_repeat.sum())
                self.acc.add("induction", layer, self._group_max(induction.sum(1)), n)
                self.acc.add("echo", layer, self._group_max(echo.sum(1)), n)

    def _error_curve(self, layer, residual, qp, k, v, logits, probs) -> None:  # noqa: ANN001
        """e_g(C) = ‖W_o,g (o_budget − o_full)‖ / ‖x‖ for the sinks + compensation + window layout."""
        s = self.settings
        pos = self.positions
        g = self.group
        n_kv, length, d = k.shape
        v_heads = v.repeat_interleave(g, 0)
        o_full = torch.einsum("hpl,hld->hpd", probs, v_heads)  # [Hq, P, D], same math as o_budget
        w_o = self.model.o_proj_weight(layer).float()  # [hidden, Hq*D]
        x_norm = residual[pos].float().norm(dim=-1).clamp_min(1e-6)  # [P]
        cum_k = torch.cat([k.new_zeros(n_kv, 1, d), k.cumsum(1)], dim=1)  # [Hkv, L+1, D]
        cum_v = torch.cat([v.new_zeros(n_kv, 1, d), v.cumsum(1)], dim=1)
        key_index = torch.arange(length, device=k.device)
        prefix = pos + 1  # tokens visible to each query
        for ci, capacity in enumerate(s.capacity_grid):
            window = capacity - s.sinks - 1
            evicted_end = prefix - window  # evicted: [sinks, evicted_end)
            n_evicted = (evicted_end - s.sinks).clamp_min(0)  # [P]
            if int(n_evicted.max()) == 0:
                continue  # every query fits: error 0 (accumulated below as zero)
            kept = (key_index[None, :] < s.sinks) | (key_index[None, :] >= evicted_end[:, None])
            kept_logits = logits.masked_fill(~kept[None], float("-inf"))
            lo = torch.full_like(evicted_end, s.sinks)
            hi = torch.maximum(evicted_end, lo)
            denom = n_evicted.clamp_min(1).float()[None, :, None]
            k_mean = (cum_k[:, hi] - cum_k[:, lo]) / denom  # [Hkv, P, D]
            v_mean = (cum_v[:, hi] - cum_v[:, lo]) / denom
            k_mean, v_mean = k_mean.repeat_interleave(g, 0), v_mean.repeat_interleave(g, 0)
            comp_logit = (qp * k_mean).sum(-1) * self.scale + torch.log(n_evicted.float().clamp_min(1))
            comp_logit = comp_logit.masked_fill(n_evicted[None, :] == 0, float("-inf"))
            top = torch.maximum(kept_logits.max(-1).values, comp_logit)  # [Hq, P]
            weights = torch.exp(kept_logits - top[..., None])
            comp_weight = torch.exp(comp_logit - top)
            numer = torch.einsum("hpl,hld->hpd", weights, v_heads) + comp_weight[..., None] * v_mean
            o_budget = numer / (weights.sum(-1) + comp_weight)[..., None]
            diff = (o_budget - o_full).permute(1, 0, 2)  # [P, Hq, D]
            # residual-stream error of each KV group through its slice of o_proj
            per_group = diff.reshape(len(pos), n_kv, g * d)
            w_groups = w_o.view(w_o.shape[0], n_kv, g * d)
            projected = torch.einsum("pgk,ogk->pgo", per_group, w_groups)
            err = projected.norm(dim=-1) / x_norm[:, None]  # [P, Hkv]
            self.acc.error_sum[layer, :, ci] += err.sum(0).to("cpu", torch.float64)
        self.acc.error_count[layer] += len(pos)


def profile_heads(
    model: CompactLM,
    prompts: Sequence[CalibPrompt],
    settings: ProfileSettings = ProfileSettings(),
    progress: Callable[[CalibPrompt], None] | None = None,
) -> HeadStatistics:
    """Run every prompt once (exact attention) and reduce the observed statistics."""
    arch = model.arch
    acc = HeadAccumulator(arch.n_layers, arch.n_kv_heads, len(settings.capacity_grid))

    attend = exact_attention(arch)

    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt.input_ids], dtype=torch.long)
            if ids.shape[1] > arch.max_context:
                raise ValueError(f"calibration prompt {prompt.name} is longer than the model context")
            observer = PromptObserver(prompt, model, acc, settings)
            model.hidden_states(ids, torch.arange(ids.shape[1]), attend, observe=observer)
            if progress is not None:
                progress(prompt)
    return _finish(acc, settings)


def _finish(acc: HeadAccumulator, settings: ProfileSettings) -> HeadStatistics:
    def mean(name: str) -> torch.Tensor:
        return (acc.sums[name] / acc.counts[name].clamp_min(1)).float()

    error = (acc.error_sum / acc.error_count.clamp_min(1)[..., None]).float()
    # error curves must not increase with capacity (more slots never hurt in expectation);
    # enforce it so the greedy allocation sees diminishing returns
    error = torch.cummin(error, dim=-1).values
    return HeadStatistics(
        capacity_grid=settings.capacity_grid,
        induction=mean("induction"),
        echo=mean("echo"),
        needle=mean("needle"),
        sink_mass=mean("sink_mass"),
        local_mass=mean("local_mass"),
        entropy=mean("entropy"),
        error=error,
    )

