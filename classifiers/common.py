"""What every classifier tool returns: probabilities and their uncertainty summaries."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Prediction(NamedTuple):
    probs: torch.Tensor  # (N, C) predictive probabilities, rows sum to 1
    label: torch.Tensor  # (N,) argmax of probs
    entropy: torch.Tensor  # (N,) entropy of probs, nats
    mutual_information: torch.Tensor  # (N,) entropy minus expected entropy, >= 0


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def summarize(sample_probs: torch.Tensor) -> Prediction:
    """Summarise K stochastic predictions per input, sample_probs shape (N, K, C).

    probs is the mean over K; mutual information is the entropy of the mean minus the
    mean entropy (the BALD decomposition), clamped at 0 against rounding.
    """
    probs = sample_probs.mean(1)  # (N, C)
    entropy = _entropy(probs)
    expected_entropy = _entropy(sample_probs).mean(1)
    mutual_information = (entropy - expected_entropy).clamp_min(0.0)
    return Prediction(probs, probs.argmax(-1), entropy, mutual_information)


def deterministic(probs: torch.Tensor) -> Prediction:
    """A single prediction per input (N, C): mutual information is 0."""
    return summarize(probs[:, None])
