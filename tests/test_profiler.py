"""Head statistics: the observer is fed synthetic q/k/v whose attention pattern is known.

A tiny Llama (2 layers, 2 KV heads, 2 query heads per KV head) supplies the architecture and
the o_proj weights; the statistics are checked against plain-torch recomputations.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from kvcompile.arch import arch_from_config
from kvcompile.profile.calibration import CalibPrompt
from kvcompile.profile.statistics import (
    HeadAccumulator,
    HeadStatistics,
    ProfileSettings,
    PromptObserver,
    _finish,
    profile_heads,
    retrieval_score,
)
from kvcompile.runtime.model import CompactLM
from tests.tiny import VOCAB, state_of, tiny_hf_model

F64 = torch.float64
HEAD_DIM = 32
PERIOD = 24
REPEATS = 4
GRID = (16, 32, 64)


@pytest.fixture(scope="module")
def model() -> CompactLM:
    hf = tiny_hf_model("llama", seed=9, num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM)
    arch = arch_from_config(hf.config)
    assert (arch.n_layers, arch.n_kv_heads, arch.group_size, arch.head_dim) == (2, 2, 2, HEAD_DIM)
    return CompactLM.from_state_dict(arch, hf.config, state_of(hf))


def repeat_prompt(seed: int = 0) -> CalibPrompt:
    """BOS (id 0) + a block of PERIOD distinct ids in [1, HEAD_DIM) repeated REPEATS times."""
    block = random.Random(seed).sample(range(1, HEAD_DIM), PERIOD)
    ids = (0, *block * REPEATS)
    return CalibPrompt("repeat", "repeat", ids, repeat_period=PERIOD, repeat_start=1)


def one_hot(ids: tuple[int, ...]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(ids), HEAD_DIM).float()  # [L, D]


def induction_qkv(prompt: CalibPrompt, strength: float = 200.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KV group 0: induction head (k_j = e(token_{j-1}), q_i = strength·e(token_i));
    KV group 1: uniform (q = 0). Values random. Shapes [1, H, L, D]."""
    e = one_hot(prompt.input_ids)
    length = e.shape[0]
    k0 = torch.cat([torch.zeros(1, HEAD_DIM), e[:-1]])  # key j carries token j-1
    gen = torch.Generator().manual_seed(5)
    k1 = torch.randn(length, HEAD_DIM, generator=gen)
    q = torch.stack([strength * e, strength * e, torch.zeros_like(e), torch.zeros_like(e)])[None]
    k = torch.stack([k0, k1])[None]
    v = torch.randn(1, 2, length, HEAD_DIM, generator=gen)
    return q, k, v


def observe(model: CompactLM, prompt: CalibPrompt, settings: ProfileSettings, layer: int,
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor) -> HeadStatistics:
    arch = model.arch
    acc = HeadAccumulator(arch.n_layers, arch.n_kv_heads, len(settings.capacity_grid))
    observer = PromptObserver(prompt, model, acc, settings)
    observer(layer, residual, q, k, v, torch.zeros_like(q))
    return _finish(acc, settings)


def random_residual(length: int, hidden: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, length, hidden, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------- retrieval scores


def test_induction_head_scores_high_uniform_head_low(model: CompactLM) -> None:
    prompt = repeat_prompt()
    q, k, v = induction_qkv(prompt)
    settings = ProfileSettings(capacity_grid=GRID)
    stats = observe(model, prompt, settings, 0, q, k, v, random_residual(len(prompt.input_ids), 64))
    assert stats.induction[0, 0] > 0.5
    assert stats.induction[0, 1] < 0.1
    # the induction head looks one past the previous occurrence, not at it
    assert stats.echo[0, 0] < 0.1
    # layer 1 was never observed: no evidence
    assert float(stats.induction[1].abs().max()) == 0.0
    assert stats.retrieval[0, 0] == stats.retrieval.max() and stats.retrieval[0, 0] > stats.retrieval[0, 1]


def test_echo_head_scores_echo(model: CompactLM) -> None:
    """k_j = e(token_j): the query matches earlier occurrences of its own token (and itself)."""
    prompt = repeat_prompt(seed=1)
    e = one_hot(prompt.input_ids)
    q = torch.stack([200 * e, 200 * e, torch.zeros_like(e), torch.zeros_like(e)])[None]
    k = torch.stack([e, e])[None]
    v = torch.randn(1, 2, e.shape[0], HEAD_DIM, generator=torch.Generator().manual_seed(0))
    stats = observe(model, prompt, ProfileSettings(capacity_grid=GRID), 0, q, k, v,
                    random_residual(e.shape[0], 64))
    # query in repeat r matches r earlier occurrences + itself: echo share r / (r + 1) >= 1/2
    assert stats.echo[0, 0] > 0.5
    assert stats.induction[0, 0] < 0.1
    assert stats.induction[0, 1] < 0.1  # uniform group


def reference_probs(q: torch.Tensor, k: torch.Tensor, positions: list[int], scale: float) -> torch.Tensor:
    """[Hq, P, L] causal softmax of the chosen query positions, float64, plain loops."""
    hq, length, _ = q.shape
    g = hq // k.shape[0]
    out = torch.zeros(hq, len(positions), length, dtype=F64)
    for h in range(hq):
        for r, p in enumerate(positions):
            logits = k[h // g, : p + 1].double() @ q[h, p].double() * scale
            out[h, r, : p + 1] = torch.softmax(logits, dim=0)
    return out


def test_mass_and_needle_statistics_match_plain_torch(model: CompactLM) -> None:
    length = 40
    gen = torch.Generator().manual_seed(3)
    ids = tuple(torch.randint(0, VOCAB, (length,), generator=gen).tolist())
    answers = (30, 35)
    prompt = CalibPrompt("probe", "passkey", ids, answer_positions=answers, needle_spans=((10, 13), (20, 21)))
    settings = ProfileSettings(capacity_grid=GRID, sinks=3, last_queries=4, local_window=8)
    q = torch.randn(1, 4, length, HEAD_DIM, generator=gen) * 2
    k = torch.randn(1, 2, length, HEAD_DIM, generator=gen)
    v = torch.randn(1, 2, length, HEAD_DIM, generator=gen)
    stats = observe(model, prompt, settings, 1, q, k, v, random_residual(length, 64))

    positions = [30, 35, 36, 37, 38, 39]  # answers + last four
    probs = reference_probs(q[0], k[0], positions, model.arch.attention_scale)
    sink = probs[..., :3].sum(-1)
    local = torch.stack([probs[:, r, max(0, p - 7): p + 1].sum(-1) for r, p in enumerate(positions)], 1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum(-1)
    needle_keys = [10, 11, 12, 20]
    answer_rows = [positions.index(a) for a in answers]
    needle = probs[:, answer_rows][..., needle_keys].sum(-1).mean(1)  # [Hq]

    def group_mean(x: torch.Tensor) -> torch.Tensor:
        return x.mean(1).view(2, 2).mean(1)

    tol = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats.sink_mass[1].double(), group_mean(sink), **tol)
    torch.testing.assert_close(stats.local_mass[1].double(), group_mean(local), **tol)
    torch.testing.assert_close(stats.entropy[1].double(), group_mean(entropy), **tol)
    torch.testing.assert_close(stats.needle[1].double(), needle.view(2, 2).max(1).values, **tol)
    assert float(stats.induction.abs().max()) == 0.0  # not a repeat prompt


def test_retrieval_score_normalises_each_signal() -> None:
    induction = torch.tensor([[0.9, 0.0], [0.45, 0.0]])
    echo = torch.tensor([[0.0, 0.2], [0.0, 0.1]])
    needle = torch.zeros(2, 2)
    score = retrieval_score(induction, echo, needle)
    expected = 0.4 * induction / 0.9 + 0.2 * echo / 0.2
    torch.testing.assert_close(score, expected)


# ------------------------------------------------------------------- error curves


def reference_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
                    w_o: torch.Tensor, group: int, capacity: int, sinks: int, pos: int,
                    scale: float) -> float:
    """‖W_o,g (o_budget − o_full)‖ / ‖x‖ for one query, sinks + compensation + window, by hand."""
    q, k, v, x, w_o = (t.double() for t in (q, k, v, x, w_o))
    hq, _, d = q.shape
    g = hq // k.shape[0]
    window = capacity - sinks - 1
    prefix = pos + 1
    kept = sorted(set(range(min(sinks, prefix))) | set(range(max(0, prefix - window), prefix)))
    evicted = [j for j in range(prefix) if j not in kept]
    diffs = []
    for h in range(group * g, (group + 1) * g):
        qh = q[h, pos]
        o_full = torch.softmax(k[group, :prefix] @ qh * scale, 0) @ v[group, :prefix]
        logits = [float(k[group, j] @ qh) * scale for j in kept]
        values = [v[group, j] for j in kept]
        if evicted:
            k_bar, v_bar = k[group, evicted].mean(0), v[group, evicted].mean(0)
            logits.append(float(k_bar @ qh) * scale + math.log(len(evicted)))
            values.append(v_bar)
        weights = torch.softmax(torch.tensor(logits, dtype=F64), 0)
        o_budget = (weights[:, None] * torch.stack(values)).sum(0)
        diffs.append(o_budget - o_full)
    columns = w_o[:, group * g * d: (group + 1) * g * d]
    return float((columns @ torch.cat(diffs)).norm() / x[pos].norm())


@pytest.mark.parametrize("layer", [0, 1])
def test_error_curve_matches_plain_torch(model: CompactLM, layer: int) -> None:
    length = 90
    gen = torch.Generator().manual_seed(10 + layer)
    prompt = CalibPrompt("text", "text", tuple(range(length)))
    grid = (8, 16, 40, 90, 128)
    settings = ProfileSettings(capacity_grid=grid, sinks=3, last_queries=1)
    q = torch.randn(1, 4, length, HEAD_DIM, generator=gen) * 1.5
    k = torch.randn(1, 2, length, HEAD_DIM, generator=gen)
    v = torch.randn(1, 2, length, HEAD_DIM, generator=gen)
    x = random_residual(length, 64, seed=layer)
    acc = HeadAccumulator(2, 2, len(grid))
    PromptObserver(prompt, model, acc, settings)(layer, x, q, k, v, torch.zeros_like(q))
    assert acc.error_count[layer].tolist() == [1.0, 1.0]  # one scored query: the last
    w_o = model.o_proj_weight(layer).detach()
    for group in range(2):
        for ci, capacity in enumerate(grid):
            expected = reference_error(q[0], k[0], v[0], x[0], w_o, group, capacity, 3, length - 1,
                                       model.arch.attention_scale)
            got = float(acc.error_sum[layer, group, ci])
            assert got == pytest.approx(expected, rel=1e-4, abs=1e-6), (group, capacity)
    # capacity 8 really drops tokens: a non-trivial check
    assert float(acc.error_sum[layer, :, 0].min()) > 1e-3
    # capacity 90 = L: sinks + window hold all but one token and the compensation slot (n = 1)
    # holds that one exactly (docs/DESIGN.md: L <= C drops nothing); 128 covers everything
    assert float(acc.error_sum[layer, :, 3].abs().max()) < 1e-5
    assert float(acc.error_sum[layer, :, 4].abs().max()) == 0.0


def test_error_zero_when_prompt_fits_every_capacity(model: CompactLM) -> None:
    prompt = CalibPrompt("short", "text", tuple(range(1, 13)))  # 12 tokens < 16
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 12, HEAD_DIM, generator=gen) * 3
    k = torch.randn(1, 2, 12, HEAD_DIM, generator=gen)
    v = torch.randn(1, 2, 12, HEAD_DIM, generator=gen)
    stats = observe(model, prompt, ProfileSettings(capacity_grid=GRID), 0, q, k, v, random_residual(12, 64))
    assert torch.equal(stats.error, torch.zeros_like(stats.error))


def test_error_positive_for_nonlocal_head_and_zero_for_uniform(model: CompactLM) -> None:
    """The induction head loses its far targets at capacity 16; a uniform head does not:
    the compensation slot (mean k, mean v, + ln n) reproduces uniform attention exactly."""
    prompt = repeat_prompt()
    q, k, v = induction_qkv(prompt)
    length = len(prompt.input_ids)
    assert length > max(GRID[:2])
    stats = observe(model, prompt, ProfileSettings(capacity_grid=GRID), 0, q, k, v,
                    random_residual(length, 64))
    copy_head, uniform_head = stats.error[0, 0], stats.error[0, 1]
    assert copy_head[0] > 0.05
    assert float(uniform_head.abs().max()) < 1e-5
    assert torch.all(copy_head[1:] <= copy_head[:-1])  # non-increasing in capacity


# ------------------------------------------------------------------- profile_heads end to end


def test_profile_heads_on_tiny_gemma_skips_sliding_layers_and_short_prompts() -> None:
    hf = tiny_hf_model("gemma3_text", seed=2)
    arch = arch_from_config(hf.config)
    model = CompactLM.from_state_dict(arch, hf.config, state_of(hf))
    gen = torch.Generator().manual_seed(4)
    long_ids = tuple(torch.randint(0, VOCAB, (60,), generator=gen).tolist())
    short_ids = long_ids[:10]
    settings = ProfileSettings(capacity_grid=(12, 24), sinks=2, last_queries=8)
    short = profile_heads(model, [CalibPrompt("s", "text", short_ids)], settings)
    assert torch.equal(short.error, torch.zeros_like(short.error))
    seen: list[str] = []
    stats = profile_heads(model, [CalibPrompt("l", "text", long_ids)], settings,
                          progress=lambda p: seen.append(p.name))
    assert seen == ["l"]
    assert stats.error.shape == (4, 4, 2)
    sliding = [i for i, w in enumerate(arch.sliding_windows) if w]
    full = [i for i, w in enumerate(arch.sliding_windows) if not w]
    assert float(stats.error[sliding].abs().max()) == 0.0
    assert float(stats.error[full][..., 0].min()) > 0.0
    # attention probabilities: masses are in [0, 1] and sliding layers see at most their window
    assert float(stats.sink_mass.max()) <= 1.0 + 1e-6 and float(stats.local_mass.min()) >= 0.0
    assert float(stats.entropy[sliding].max()) <= math.log(arch.sliding_windows[sliding[0]]) + 1e-5


def test_profile_heads_rejects_prompt_longer_than_context(model: CompactLM) -> None:
    too_long = CalibPrompt("x", "text", (1,) * (model.arch.max_context + 1))
    with pytest.raises(ValueError, match="longer than the model context"):
        profile_heads(model, [too_long], ProfileSettings(capacity_grid=GRID))


def test_profiling_in_bfloat16_keeps_the_statistics() -> None:
    """``profile --dtype bfloat16`` (a GPU's precision): the observer upcasts, so scores and
    error curves stay within bf16 noise of float32 and the retrieval ranking is the same."""
    from tests.test_profile_io import SETTINGS, tiny_prompts
    from tests.tiny import tiny_loaded

    loaded = tiny_loaded("qwen2", seed=6)
    full = profile_heads(loaded.build(), tiny_prompts(), SETTINGS)
    half = profile_heads(loaded.build().to(torch.bfloat16), tiny_prompts(), SETTINGS)
    assert not torch.equal(full.error, half.error)  # really ran in another precision
    assert (full.retrieval - half.retrieval).abs().max() < 0.05
    assert ((full.error - half.error).abs() / full.error.abs().clamp_min(1e-3)).max() < 0.05
    top = 4
    assert torch.equal(full.retrieval.flatten().argsort(descending=True)[:top],
                       half.retrieval.flatten().argsort(descending=True)[:top])
