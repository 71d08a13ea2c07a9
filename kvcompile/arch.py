"""Architecture description derived from a transformers config.

Everything downstream (profiler, fitter, runtime, memory tables) reads this instead of
the config, so supporting a family is one place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral", "gemma3_text")


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of one layer type: inverse frequencies come from transformers."""

    theta: float
    rope_type: str
    params: dict[str, Any]


@dataclass(frozen=True)
class ArchSpec:
    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_context: int
    rms_eps: float
    # per layer: None for full attention, else the model's own sliding window
    sliding_windows: tuple[int | None, ...]
    rope: tuple[Rope, ...]  # per layer
    attention_scale: float
    attention_bias: bool
    mlp_bias: bool
    qk_norm: bool
    gemma_norms: bool  # (1 + w) RMSNorm, sandwich norms, scaled embeddings
    activation: str
    tie_embeddings: bool
    final_softcap: float | None

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def n_kv_total(self) -> int:
        return self.n_layers * self.n_kv_heads

    def describe(self) -> dict[str, Any]:
        sliding = [i for i, w in enumerate(self.sliding_windows) if w]
        return {
            "family": self.family,
            "layers": self.n_layers,
            "query_heads": self.n_heads,
            "kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_context": self.max_context,
            "sliding_layers": sliding,
            "sliding_window": self.sliding_windows[sliding[0]] if sliding else None,
        }


def _get(config: Any, name: str, default: Any = None) -> Any:
    value = getattr(config, name, default)
    return default if value is None else value


def _rope_for(config: Any, layer_type: str) -> Rope:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    params = dict(params)
    theta = float(params.get("rope_theta", _get(config, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    return Rope(theta=theta, rope_type=rope_type, params=params)


def arch_from_config(config: Any) -> ArchSpec:
    """Build the ArchSpec; unsupported families raise ValueError naming the supported ones."""
    family = getattr(config, "model_type", None)
    if family == "gemma3":  # multimodal wrapper: use its text part
        config = config.text_config
        family = config.model_type
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"unsupported model family {family!r}; kvcompile supports {', '.join(SUPPORTED_FAMILIES)}"
        )
    n_layers = int(config.num_hidden_layers)
    n_heads = int(config.num_attention_heads)
    n_kv = int(_get(config, "num_key_value_heads", n_heads))
    hidden = int(config.hidden_size)
    head_dim = int(_get(config, "head_dim", hidden // n_heads))
    window = _get(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if family == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = None
    if layer_types:
        windows = tuple(int(window) if t == "sliding_attention" and window else None for t in layer_types)
    else:
        windows = tuple(int(window) if window else None for _ in range(n_layers))
    layer_kinds = layer_types or ["full_attention"] * n_layers
    gemma = family == "gemma3_text"
    scale_base = _get(config, "query_pre_attn_scalar", head_dim) if gemma else head_dim
    activation = _get(config, "hidden_activation", None) or _get(config, "hidden_act", "silu")
    return ArchSpec(
        family=family,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        hidden_size=hidden,
        intermediate_size=int(config.intermediate_size),
        vocab_size=int(config.vocab_size),
        max_context=int(_get(config, "max_position_embeddings", 2048)),
        rms_eps=float(_get(config, "rms_norm_eps", 1e-6)),
        sliding_windows=windows,
        rope=tuple(_rope_for(config, kind) for kind in layer_kinds),
        attention_scale=1.0 / math.sqrt(float(scale_base)),
        attention_bias=bool(_get(config, "attention_bias", family == "qwen2")),
        mlp_bias=bool(_get(config, "mlp_bias", False)),
        qk_norm=gemma,
        gemma_norms=gemma,
        activation=str(activation),
        tie_embeddings=bool(_get(config, "tie_word_embeddings", False)),
        final_softcap=_get(config, "final_logit_softcapping", None),
    )


def arch_from_description(described: dict[str, Any]) -> ArchSpec:
    """The cache-sizing fields of an ArchSpec from ``describe()`` (a profile's record).

    Enough for fitting and memory tables without the model; the fields that only the forward
    pass needs are left neutral.
    """
    n_layers = int(described["layers"])
    sliding = set(described.get("sliding_layers") or [])
    window = described.get("sliding_window")
    return ArchSpec(
        family=str(described["family"]), n_layers=n_layers, n_heads=int(described["query_heads"]),
        n_kv_heads=int(described["kv_heads"]), head_dim=int(described["head_dim"]), hidden_size=0,
        intermediate_size=0, vocab_size=0, max_context=int(described["max_context"]), rms_eps=0.0,
        sliding_windows=tuple(int(window) if i in sliding and window else None for i in range(n_layers)),
        rope=(), attention_scale=1.0, attention_bias=False, mlp_bias=False, qk_norm=False, gemma_norms=False,
        activation="", tie_embeddings=False, final_softcap=None,
    )
