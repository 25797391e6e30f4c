"""Proposals: what a kernel draws its candidate from.

An independent proposal is a callable `propose(noise) -> x` drawing one sample per row
(a GAN generator on fresh latents). A Markov proposal is `propose(y, noise, scale) -> x`
drawing x ~ q(x | y) around the current state y.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from samplers._core import Noise

IndependentProposal = Callable[[Noise], torch.Tensor]
MarkovProposal = Callable[[torch.Tensor, Noise, torch.Tensor], torch.Tensor]


def independent(generator: Callable[[torch.Tensor], torch.Tensor], latent_dim: int):
    """x = G(z) with z ~ N(0, I) drawn from each row's own stream."""

    def propose(noise: Noise) -> torch.Tensor:
        return generator(noise.normal(latent_dim))

    return propose


def gaussian_perturbation(y: torch.Tensor, noise: Noise, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric data-space random walk: x = y + scale * xi, xi ~ N(0, I) per row."""
    scale = scale.view(-1, *([1] * (y.dim() - 1)))  # (B, 1, ..., 1)
    return y + scale * noise.normal(*y.shape[1:]).to(y.dtype)


def conditional(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise_dim: int):
    """A learned conditional generator q(x | y) = model(y, xi), xi ~ N(0, I); scale unused."""

    def propose(y: torch.Tensor, noise: Noise, scale: torch.Tensor) -> torch.Tensor:
        return model(y, noise.normal(noise_dim).to(y.dtype))

    return propose
