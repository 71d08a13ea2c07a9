"""Model loading, the architecture description and the compact decoder.

The reference for every logit comparison is transformers' own model with eager attention.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kvcompile.arch import arch_from_config
from kvcompile.errors import ModelLoadError
from kvcompile.models import LoadedModel, fingerprint_weights, load_model
from kvcompile.runtime.model import CompactLM
from kvcompile.runtime.ops import budgeted_attention
from tests.tiny import (
    VOCAB,
    compact_logits,
    exact_attend,
    save_tokenizer,
    state_of,
    tiny_config,
    tiny_hf_model,
)

FAMILIES = ("llama", "qwen2", "mistral", "gemma3_text")


def _ids(batch: int, length: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf_model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(ids).logits


# --------------------------------------------------------------------------- CompactLM


@pytest.mark.parametrize("family", FAMILIES)
def test_compact_logits_equal_transformers(family: str) -> None:
    hf = tiny_hf_model(family, seed=11)
    arch = arch_from_config(hf.config)
    model = CompactLM.from_state_dict(arch, hf.config, state_of(hf))
    ids = _ids(2, 24)  # longer than every tiny sliding window
    torch.testing.assert_close(compact_logits(model, ids), _hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


VARIANTS = {
    "llama-bias-tied": ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "llama3-rope": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "yarn-rope": ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 5000.0,
                                                 "original_max_position_embeddings": 128})),
    "qwen2-mixed-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "gemma3-linear-global-rope": ("gemma3_text", dict(rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}})),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compact_logits_equal_transformers_variants(variant: str) -> None:
    family, overrides = VARIANTS[variant]
    hf = tiny_hf_model(family, seed=12, **overrides)
    arch = arch_from_config(hf.config)
    model = CompactLM.from_state_dict(arch, hf.config, state_of(hf))
    ids = _ids(1, 40)
    torch.testing.assert_close(compact_logits(model, ids), _hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_arch_qwen2_sliding_only_above_max_window_layers() -> None:
    arch = arch_from_config(tiny_config("qwen2", use_sliding_window=True, sliding_window=6,
                                        max_window_layers=1))
    assert arch.sliding_windows == (None, 6)


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_sliding_window_matters_in_the_comparison(family: str) -> None:
    """Guard for the test above: ignoring the model's window must change the logits."""
    hf = tiny_hf_model(family, seed=11)
    arch = arch_from_config(hf.config)
    model = CompactLM.from_state_dict(arch, hf.config, state_of(hf))
    ids = _ids(1, 24)

    def no_window(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return budgeted_attention(q, k, v, None, causal=True, window=0, scale=arch.attention_scale)

    with torch.no_grad():
        wrong = model.logits(model.hidden_states(ids, torch.arange(24), no_window))
    assert (wrong - _hf_logits(hf, ids)).abs().max() > 1e-2


def test_compact_positions_offset_match_transformers() -> None:
    """Explicit positions (as the runtime passes in decode) follow transformers' position_ids."""
    hf = tiny_hf_model("llama", seed=5)
    arch = arch_from_config(hf.config)
    model = CompactLM.from_state_dict(arch, hf.config, state_of(hf))
    ids = _ids(1, 10)
    positions = torch.arange(7, 17)
    with torch.no_grad():
        ref = hf(ids, position_ids=positions[None]).logits
        out = model.logits(model.hidden_states(ids, positions, exact_attend(arch)))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- ArchSpec


def test_arch_llama() -> None:
    config = tiny_config("llama")
    arch = arch_from_config(config)
    assert (arch.family, arch.n_layers, arch.n_heads, arch.n_kv_heads) == ("llama", 2, 8, 4)
    assert arch.group_size == 2
    assert arch.head_dim == config.hidden_size // config.num_attention_heads
    assert arch.sliding_windows == (None, None)
    assert arch.attention_scale == pytest.approx(arch.head_dim**-0.5)
    assert not arch.attention_bias and not arch.qk_norm and not arch.gemma_norms
    assert arch.max_context == config.max_position_embeddings
    assert all(r.theta == 5000.0 for r in arch.rope)


def test_arch_qwen2_has_bias_and_no_window_unless_enabled() -> None:
    arch = arch_from_config(tiny_config("qwen2", sliding_window=7, use_sliding_window=False))
    assert arch.attention_bias
    assert arch.sliding_windows == (None, None)


def test_arch_mistral_window_on_every_layer() -> None:
    arch = arch_from_config(tiny_config("mistral", sliding_window=6))
    assert arch.family == "mistral"
    assert arch.sliding_windows == (6, 6)
    assert arch.group_size == 2


def test_arch_gemma3_text() -> None:
    config = tiny_config("gemma3_text")
    arch = arch_from_config(config)
    assert arch.family == "gemma3_text"
    assert arch.sliding_windows == (5, None, 5, None)
    assert arch.head_dim == 16  # explicit head_dim, not hidden / heads
    assert arch.group_size == 2
    assert arch.attention_scale == pytest.approx(24**-0.5)
    assert arch.attention_scale != pytest.approx(1 / math.sqrt(arch.head_dim))
    assert arch.qk_norm and arch.gemma_norms
    assert arch.final_softcap == 3.0
    # sliding and full layers carry their own RoPE base (local 10k, global 1M by default)
    thetas = [r.theta for r in arch.rope]
    assert thetas[0] == thetas[2] and thetas[1] == thetas[3] and thetas[0] != thetas[1]
    assert arch.describe()["sliding_layers"] == [0, 2]


def test_arch_rejects_unsupported_family() -> None:
    with pytest.raises(ValueError, match="gpt2"):
        arch_from_config(tiny_config("gpt2"))


# --------------------------------------------------------------------------- load_model


def _save_tiny(directory: Path, family: str = "llama", seed: int = 2) -> torch.nn.Module:
    hf = tiny_hf_model(family, seed=seed)
    hf.save_pretrained(directory)
    save_tokenizer(directory)
    return hf


def test_load_model_from_local_directory(tmp_path: Path) -> None:
    directory = tmp_path / "tiny-llama"
    hf = _save_tiny(directory)
    loaded = load_model(str(directory), reuse=False)
    assert loaded.name == "tiny-llama"
    assert loaded.arch == arch_from_config(hf.config)
    expected = state_of(hf)
    assert sorted(loaded.state) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded.state[name], tensor), name
    assert loaded.tokenizer("w5 w7 w9", add_special_tokens=False)["input_ids"] == [5, 7, 9]
    ids = _ids(1, 12)
    torch.testing.assert_close(compact_logits(loaded.build(), ids), _hf_logits(hf, ids),
                               atol=1e-5, rtol=1e-5)


def test_load_model_memoises_per_path(tmp_path: Path) -> None:
    directory = tmp_path / "m"
    _save_tiny(directory)
    first = load_model(str(directory))
    assert load_model(str(directory)) is first
    assert load_model(str(directory), reuse=False) is not first


def test_load_model_sees_weights_rewritten_in_place(tmp_path: Path) -> None:
    """The per-process memo must not serve stale weights after the checkpoint file changes."""
    directory, other = tmp_path / "m", tmp_path / "other"
    _save_tiny(directory, seed=1)
    replacement = tiny_hf_model("llama", seed=2)
    replacement.save_pretrained(other)
    first_fingerprint = load_model(str(directory)).fingerprint  # before the file changes
    (directory / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    again = load_model(str(directory))
    name = "model.embed_tokens.weight"
    assert torch.equal(again.state[name], replacement.state_dict()[name])
    assert again.fingerprint != first_fingerprint


def _one_line_error(source: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(source, reuse=False)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_uncached_hub_id_says_how_to_download(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("KVCOMPILE_ALLOW_DOWNLOAD", raising=False)
    message = _one_line_error("kvcompile-tests/no-such-model-4f2a")
    assert "KVCOMPILE_ALLOW_DOWNLOAD" in message
    assert "kvcompile-tests/no-such-model-4f2a" in message


def test_unknown_path(tmp_path: Path) -> None:
    message = _one_line_error(str(tmp_path / "nowhere" / "model"))
    assert "not found" in message


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert "config.json" in _one_line_error(str(tmp_path))


def test_plain_file_that_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert "neither a model directory nor a .gguf file" in _one_line_error(str(path))


def test_missing_gguf(tmp_path: Path) -> None:
    assert "does not exist" in _one_line_error(str(tmp_path / "absent.gguf"))


def test_gguf_with_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "random.gguf"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    assert "not a GGUF file" in _one_line_error(str(path))


def test_gguf_magic_then_garbage(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    garbage = torch.randint(0, 256, (4096,), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(1)).numpy().tobytes()
    path.write_bytes(b"GGUF" + garbage)
    message = _one_line_error(str(path))
    assert "could not load model" in message and str(path) in message


def test_unsupported_family_directory(tmp_path: Path) -> None:
    directory = tmp_path / "gpt2"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_config("gpt2")).save_pretrained(directory)
    save_tokenizer(directory)
    message = _one_line_error(str(directory))
    assert "unsupported model family 'gpt2'" in message and "llama" in message


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_weights_and_architecture() -> None:
    hf = tiny_hf_model("llama", seed=4)
    state = state_of(hf)
    base = fingerprint_weights(hf.config, state)
    assert fingerprint_weights(hf.config, {k: v.clone() for k, v in state.items()}) == base
    changed = dict(state)
    name = "model.layers.1.mlp.up_proj.weight"
    changed[name] = state[name].clone()
    changed[name][3, 5] += 1e-3
    assert fingerprint_weights(hf.config, changed) != base
    renamed = {("x." + k if k == name else k): v for k, v in state.items()}
    assert fingerprint_weights(hf.config, renamed) != base
    other = tiny_config("llama", max_position_embeddings=1024)
    assert fingerprint_weights(other, state) != base


# --------------------------------------------------------------------------- real SmolLM2


@pytest.mark.slow
def test_smollm2_arch(smollm2: LoadedModel) -> None:
    arch = smollm2.arch
    assert arch.family == "llama"
    assert (arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.head_dim) == (30, 9, 3, 64)
    assert arch.max_context == 8192
    assert arch.group_size == 3
    assert arch.sliding_windows == (None,) * 30
    assert arch.tie_embeddings and "lm_head.weight" not in smollm2.state


@pytest.mark.slow
def test_smollm2_compact_equals_transformers(smollm2: LoadedModel) -> None:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(smollm2.config, attn_implementation="eager")
    missing, unexpected = hf.load_state_dict(smollm2.state, strict=False, assign=True)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=smollm2.config)  # buffers off meta
    hf.eval()
    ids = smollm2.tokenizer("The capital of France is Paris, and the capital of Italy is",
                            return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(compact_logits(smollm2.build(), ids), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_fingerprint_stable_and_weight_sensitive(smollm2: LoadedModel) -> None:
    first = smollm2.fingerprint
    assert first.startswith("sha256:")
    assert fingerprint_weights(smollm2.config, smollm2.state) == first
    changed = dict(smollm2.state)
    name = "model.layers.17.self_attn.v_proj.weight"
    changed[name] = smollm2.state[name].clone()
    changed[name][0, 0] = torch.nextafter(changed[name][0, 0], torch.tensor(1.0))
    assert fingerprint_weights(smollm2.config, changed) != first
