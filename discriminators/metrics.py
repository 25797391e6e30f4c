"""Calibration metrics for a discriminator's probability D(x) that x is real.

`probs` is D on each row, `labels` is 1 for real rows and 0 for generated ones. All three
return plain floats, computed in float64.

- `expected_calibration_error`: sum over equal-width bins of D of the bin's share of rows
  times |mean label - mean D| (the reliability-diagram ECE on D itself, not on
  max(D, 1 - D)). 0 is perfect; it is biased upwards by about sqrt(bins / n).
- `brier_score`: mean (D - y)^2; it mixes calibration and sharpness.
- `dawid_z`: sum(y - D) / sqrt(sum D (1 - D)). Under perfect calibration and independent
  labels it is approximately N(0, 1), so |z| > 3 flags miscalibration; its sign says
  whether D under-rates (z > 0) or over-rates (z < 0) how real the rows are.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _as_float64(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    probs = torch.as_tensor(probs).detach().to("cpu", torch.float64).flatten()
    labels = torch.as_tensor(labels).detach().to("cpu", torch.float64).flatten()
    assert probs.shape == labels.shape, "one label per probability"
    assert len(probs) > 0, "need at least one row"
    return probs, labels


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE over `bins` equal-width bins of [0, 1]."""
    probs, labels = _as_float64(probs, labels)
    bin_of_row = (probs * bins).floor().clamp(0, bins - 1).long()  # D = 1 joins the last bin
    # sum_b (n_b / n) |mean_b(y) - mean_b(D)| = sum_b |sum_b(y - D)| / n
    gap_per_bin = torch.bincount(bin_of_row, weights=labels - probs, minlength=bins).abs()
    return (gap_per_bin.sum() / len(probs)).item()


def brier_score(probs: Tensor, labels: Tensor) -> float:
    """Mean squared difference between D and the label."""
    probs, labels = _as_float64(probs, labels)
    return ((probs - labels) ** 2).mean().item()


def dawid_z(probs: Tensor, labels: Tensor) -> float:
    """Dawid's prequential Z: sum(y - D) / sqrt(sum D (1 - D))."""
    probs, labels = _as_float64(probs, labels)
    variance = (probs * (1 - probs)).sum().item()
    residual = (labels - probs).sum().item()
    if variance == 0.0:  # every D is exactly 0 or 1: any residual is infinitely surprising
        return 0.0 if residual == 0.0 else math.copysign(math.inf, residual)
    return residual / math.sqrt(variance)
