"""End-to-end layer sensitivity against a plain-torch recomputation over the whole prompt.

The reference runs context + question in one pass and masks, for the question rows of a
compressed head, every context key the layout evicts (adding the compensation slot as an
explicit extra key). The module under test instead prefills the context once, compresses
it with the runtime's ``compress_prefill`` and replays only the question tokens, from the
changed layer up; both must give the same answer NLL.
"""
from __future__ import annotations

import math

import pytest
import torch

from kvcompile.arch import arch_from_config
from kvcompile.profile.calibration import CalibPrompt
from kvcompile.profile.sensitivity import FULL, SensitivitySettings, _ProbeRun, layer_sensitivity
from kvcompile.runtime.model import CompactLM
from kvcompile.settings import FitSettings
from tests.tiny import VOCAB, state_of, tiny_hf_model

N_CTX = 48
SINKS = 2
FULL_HEADS = {(1, 0)}  # layer 1 keeps KV head 0 whole; everything else is budgeted
GRID = (8, 16, 32, 64)


@pytest.fixture(scope="module")
def model() -> CompactLM:
    hf = tiny_hf_model("llama", seed=3, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    arch = arch_from_config(hf.config)
    return CompactLM.from_state_dict(arch, hf.config, state_of(hf))


@pytest.fixture(scope="module")
def probe() -> CalibPrompt:
    gen = torch.Generator().manual_seed(11)
    ids = tuple(int(t) for t in torch.randint(3, VOCAB, (N_CTX + 12,), generator=gen))
    return CalibPrompt("probe", "passkey", ids, answer_positions=(N_CTX + 8, N_CTX + 9, N_CTX + 10),
                       context_length=N_CTX)


def settings(compensation: int) -> SensitivitySettings:
    return SensitivitySettings(reference_capacity=16,
                               fit=FitSettings(sinks=SINKS, compensation=compensation, selected_fraction=0.0))


def reference_nll(model: CompactLM, prompt: CalibPrompt, capacities: list[int], compensation: int) -> float:
    """Whole-prompt pass; question rows of budgeted heads see sinks + window (+ mean slot)."""
    arch = model.arch
    ids = torch.tensor([prompt.input_ids])
    length = ids.shape[1]
    g = arch.group_size

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(q)
        for qh in range(q.shape[1]):
            kh = qh // g
            keys, values = k[0, kh], v[0, kh]
            logits = q[0, qh] @ keys.T * arch.attention_scale  # [L, L]
            visible = torch.ones(length, length, dtype=torch.bool).tril()
            capacity = capacities[layer]
            extra_logit = torch.full((length,), float("-inf"))
            k_mean = v_mean = torch.zeros(keys.shape[-1])
            if (layer, kh) not in FULL_HEADS and capacity != FULL and capacity < N_CTX:
                window = capacity - SINKS - compensation
                evicted = torch.zeros(length, dtype=torch.bool)
                evicted[SINKS:N_CTX - window] = True
                visible[N_CTX:, :] &= ~evicted  # question rows lose the evicted context keys
                if compensation:
                    n = int(evicted.sum())
                    k_mean, v_mean = keys[evicted].mean(0), values[evicted].mean(0)
                    extra_logit[N_CTX:] = q[0, qh, N_CTX:] @ k_mean * arch.attention_scale + math.log(n)
            logits = logits.masked_fill(~visible, float("-inf"))
            weights = torch.softmax(torch.cat([logits, extra_logit[:, None]], dim=1), dim=1)
            out[0, qh] = weights[:, :length] @ values + weights[:, length:] * v_mean
        return out

    with torch.no_grad():
        logits = model.logits(model.hidden_states(ids, torch.arange(length), attend))[0].float()
    rows = torch.tensor(prompt.answer_positions)
    logp = torch.log_softmax(logits[rows], dim=-1)
    return float(-logp.gather(1, ids[0, rows + 1][:, None]).mean())


@pytest.mark.parametrize("compensation", [0, 1])
@pytest.mark.parametrize("capacities", [[FULL, FULL, FULL], [8, FULL, 16], [FULL, 12, FULL], [16, 32, 8]])
def test_replay_matches_whole_prompt_reference(model, probe, compensation, capacities):
    run = _ProbeRun(model, probe, settings(compensation), FULL_HEADS)
    expected = reference_nll(model, probe, capacities, compensation)
    assert run.answer_nll(capacities) == pytest.approx(expected, abs=1e-5)


def test_replay_from_a_middle_layer_matches_the_full_pass(model, probe):
    run = _ProbeRun(model, probe, settings(1), FULL_HEADS)
    reference = [16, 16, 16]
    entries: list[torch.Tensor] = []
    run.answer_nll(reference, entries=entries)
    changed = [16, 16, 8]  # only the top layer differs: replaying it alone must suffice
    assert run.answer_nll(changed, 2, entries[2]) == pytest.approx(run.answer_nll(changed), abs=1e-6)
    assert len(entries) == 3


def test_curves_are_the_reference_loss_per_layer(model, probe):
    s = settings(1)
    curves = layer_sensitivity(model, [probe], FULL_HEADS, GRID, s)
    raw = torch.zeros(3, len(GRID))
    for layer in range(3):
        state = [s.reference_capacity] * 3
        state[layer] = FULL
        base = reference_nll(model, probe, state, 1)
        for ci, capacity in enumerate(GRID):
            state[layer] = capacity
            raw[layer, ci] = reference_nll(model, probe, state, 1) - base
    expected = torch.cummin(raw.clamp_min(0), dim=-1).values
    assert torch.allclose(curves, expected, atol=1e-5)
    assert float(curves.sum()) > 0  # the tiny model does notice its context being cut
    assert torch.all(curves[:, GRID.index(64)] == 0)  # capacity >= context: nothing evicted


def test_layers_without_budgeted_heads_and_prompts_without_probes_cost_nothing(model, probe):
    all_full = {(layer, head) for layer in range(3) for head in range(2)}
    assert torch.all(layer_sensitivity(model, [probe], all_full, GRID, settings(1)) == 0)
    text = CalibPrompt("text", "text", probe.input_ids)
    assert torch.all(layer_sensitivity(model, [text], FULL_HEADS, GRID, settings(1)) == 0)


def test_replay_from_a_block_needs_its_input(model, probe):
    ids = torch.tensor([probe.input_ids[:4]])
    with pytest.raises(ValueError, match="start_hidden"):
        model.hidden_states(ids, torch.arange(4), lambda *a: None, start_layer=1)
