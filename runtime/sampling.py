"""Picking the next token from numpy logits: the onnxruntime backend's sampler and the
scheduler's (each request brings its own settings and generator). Torch-free."""
from __future__ import annotations

import numpy as np

__all__ = ["sample"]


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0 (the torch engine's choice, first maximum), else nucleus sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        keep = np.cumsum(sorted_probs) - sorted_probs < top_p  # always keeps the top token
        probs = np.zeros_like(probs)
        probs[order[keep]] = sorted_probs[keep]
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))
