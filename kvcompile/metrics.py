"""The loss metrics, defined once: NLL, KL and greedy agreement of next-token distributions.

The fit (the measured choice, the held-out validation), the sensitivity profile, the build's
low-precision check and eval all score a system against a reference through these functions,
so a number called "KL" or "NLL increase" means the same thing in every file that prints one.

Conventions (as in ``runtime/ops.py``): logits and log-probabilities are ``[T, V]``, one row
per scored position, row ``t`` the distribution of the token at ``targets[t]``; natural
logarithms (nats); every metric is a mean over rows and returns a Python float.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompile.stats import nll_increase  # noqa: F401 - kept here with the other metrics


def log_probs(logits: Tensor) -> Tensor:
    """Log-softmax over the vocabulary, in float32 whatever the logits' dtype."""
    return torch.log_softmax(logits.float(), dim=-1)


def nll(logp: Tensor, targets: Tensor) -> float:
    """Mean negative log-likelihood of ``targets`` [T] under ``logp`` [T, V]:
    ``-(1/T) Σ_t logp[t, targets[t]]``."""
    return float(-logp.gather(1, targets[:, None]).mean())


def kl(reference: Tensor, logp: Tensor) -> float:
    """Mean KL(reference || system) per row, from log-probabilities [T, V]:
    ``(1/T) Σ_t Σ_v p_ref[t, v] (log p_ref[t, v] - logp[t, v])``.

    Each row's sum is clamped at 0: it is non-negative in exact arithmetic, and float
    rounding on identical or nearly identical rows must not report a negative divergence.
    """
    return float((reference.exp() * (reference - logp)).sum(-1).clamp_min(0).mean())


def greedy_token(logits: Tensor) -> int:
    """The greedy choice of one distribution [V] (the first index on a tie, as torch)."""
    return int(logits.argmax())


def greedy_agreement(reference: Tensor, logits: Tensor) -> float:
    """Share of rows where the system's greedy token is the reference's: logits [..., V] of the
    same shape, the argmax taken over the last axis. Exact: agreed rows over all rows."""
    agreed = reference.argmax(-1) == logits.argmax(-1)
    return int(agreed.sum()) / agreed.numel()
