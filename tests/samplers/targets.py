"""Targets whose density ratio to the proposal is known exactly.

p is a two-component Gaussian mixture on the line, p_G a wide Gaussian; the exact
log p / p_G stands in for a discriminator's calibrated logit.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats

MEANS = (-1.5, 1.5)
STD = 0.5
GENERATOR_STD = 3.0


def log_p(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(len(x), -1)[:, 0].double()
    comps = [-0.5 * ((x - m) / STD) ** 2 - math.log(STD * math.sqrt(2 * math.pi)) for m in MEANS]
    return torch.logsumexp(torch.stack(comps), 0) - math.log(len(MEANS))


def log_p_generator(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(len(x), -1)[:, 0].double()
    return -0.5 * (x / GENERATOR_STD) ** 2 - math.log(GENERATOR_STD * math.sqrt(2 * math.pi))


def log_ratio(x: torch.Tensor) -> torch.Tensor:
    """Exact log p(x) / p_G(x), shape (B,)."""
    return (log_p(x) - log_p_generator(x)).float()


def generator(z: torch.Tensor) -> torch.Tensor:
    """p_G = N(0, GENERATOR_STD^2) as a 'generator' of 1-D samples, shape (B, 1)."""
    return GENERATOR_STD * z


def cdf(x: np.ndarray) -> np.ndarray:
    return np.mean([stats.norm.cdf(x, m, STD) for m in MEANS], axis=0)


def ks_pvalue(samples: torch.Tensor) -> float:
    return float(stats.kstest(samples.reshape(-1).double().numpy(), cdf).pvalue)


# A correct kernel must pass at this level; a broken one must fail far below it.
PASS_P = 1e-3
FAIL_P = 1e-6


class LatentTarget:
    """A user-style generator G(z) = SLOPE z (1-D latent) and a Gaussian-mixture target p,
    with the exact log p / p_G as the discriminator: the latent chains' law pushed
    through G is p exactly."""

    SLOPE = 2.5

    def __init__(self, means: tuple[float, ...], weights: tuple[float, ...], std: float):
        self.means, self.weights, self.std = means, weights, std

    def generator(self, z: torch.Tensor) -> torch.Tensor:
        return self.SLOPE * z

    def log_p(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), -1)[:, 0].double()
        comps = [
            math.log(w)
            - 0.5 * ((x - m) / self.std) ** 2
            - math.log(self.std * math.sqrt(2 * math.pi))
            for m, w in zip(self.means, self.weights, strict=True)
        ]
        return torch.logsumexp(torch.stack(comps), 0)

    def log_ratio(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) / p_G(x), p_G = N(0, SLOPE^2); differentiable."""
        flat = x.reshape(len(x), -1)[:, 0].double()
        log_p_g = -0.5 * (flat / self.SLOPE) ** 2 - math.log(self.SLOPE * math.sqrt(2 * math.pi))
        return (self.log_p(x) - log_p_g).float()

    def cdf(self, x: np.ndarray) -> np.ndarray:
        return sum(
            w * stats.norm.cdf(x, m, self.std)
            for m, w in zip(self.means, self.weights, strict=True)
        )

    def ks_pvalue(self, samples: torch.Tensor) -> float:
        return float(stats.kstest(samples.reshape(-1).double().numpy(), self.cdf).pvalue)


TWO_MODES = LatentTarget(means=(-1.5, 1.2), weights=(0.3, 0.7), std=0.45)
ONE_MODE = LatentTarget(means=(1.2,), weights=(1.0,), std=0.45)
