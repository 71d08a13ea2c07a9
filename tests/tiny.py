"""Tiny random models of every supported family, for tests that must not load SmolLM2.

Weights are perturbed after construction (norm weights, biases and projections all get
noise) so that a bug which ignores a norm or a bias cannot hide behind default init values.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvcompile.arch import ArchSpec, arch_from_config
from kvcompile.models import LoadedModel
from kvcompile.runtime.model import AttendFn, CompactLM, exact_attention

VOCAB = 96

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
)


def tiny_config(family: str, **overrides: Any) -> Any:
    """A transformers config of ``family`` (llama, qwen2, mistral, gemma3_text, gpt2)."""
    from transformers import (
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    if family == "llama":
        config = LlamaConfig(**{**_COMMON, "rope_theta": 5000.0, **overrides})
    elif family == "qwen2":
        config = Qwen2Config(**{**_COMMON, **overrides})
    elif family == "mistral":
        config = MistralConfig(**{**_COMMON, "sliding_window": 6, **overrides})
    elif family == "gemma3_text":
        base = {
            **_COMMON,
            "num_hidden_layers": 4,
            "head_dim": 16,
            "sliding_window": 5,
            "query_pre_attn_scalar": 24,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "final_logit_softcapping": 3.0,
        }
        config = Gemma3TextConfig(**{**base, **overrides})
    elif family == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    else:
        raise ValueError(family)
    config._attn_implementation = "eager"
    return config


def tiny_hf_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A transformers model of ``family`` with every parameter perturbed (eager attention)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() == 1:  # norm weights and biases: move away from 0 / 1
                param.add_(0.3 * noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5 * (2.0 if "proj" in name else 1.0))
    return model.eval()


def state_of(hf_model: Any) -> dict[str, torch.Tensor]:
    """The state dict as load_model returns it (tied lm_head dropped)."""
    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    if arch_from_config(hf_model.config).tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def exact_attend(arch: ArchSpec) -> AttendFn:
    """Plain causal attention with the model's own sliding windows, via the kvcompile op."""
    return exact_attention(arch)


def compact_logits(model: CompactLM, ids: torch.Tensor) -> torch.Tensor:
    """Uncompressed logits of the compact decoder for ``ids`` [B, T]."""
    with torch.no_grad():
        hidden = model.hidden_states(ids, torch.arange(ids.shape[1]), exact_attend(model.arch))
        return model.logits(hidden)


def tiny_loaded(family: str = "llama", seed: int = 0, **overrides: Any) -> LoadedModel:
    """A LoadedModel around a tiny random model (no tokenizer)."""
    hf = tiny_hf_model(family, seed, **overrides)
    state = state_of(hf)
    arch = arch_from_config(hf.config)
    return LoadedModel(source=f"tiny-{family}", name=f"tiny-{family}", config=hf.config,
                       tokenizer=None, state=state, arch=arch)


def save_tokenizer(directory: Path, vocab_size: int = VOCAB) -> None:
    """A word-level fast tokenizer built offline, saved next to a model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(directory)
