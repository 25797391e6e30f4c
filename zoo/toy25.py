"""The 25-Gaussians demo model (MH-GAN's toy problem): a 2-D generator on the grid.

G and D are MLPs with 4 hidden ReLU layers of 100 units and z ~ N(0, I_2), as in MH-GAN.
Points are in the grid's own coordinates (means on {-2, ..., 2}^2, std 0.05): the
generator's output is the sample, with no rescaling anywhere.

The sample discriminators for this generator are
`discriminators.architectures.MLPDiscriminator(input_dim=2, width=100, depth=4)`; the
pair discriminator for the data-space Gaussian random walk is `PotentialPairDiscriminator`
below. Training: `python -m zoo.train_toy25`; weights ship in zoo/store/toy25*.

Example:
    >>> g = Generator()
    >>> g(torch.randn(5, 2)).shape
    torch.Size([5, 2])
"""

from __future__ import annotations

import math

import torch
from torch import nn

from architectures import architecture
from discriminators.architectures import mlp


@architecture
class Generator(nn.Module):
    """z (B, latent_dim) -> x (B, 2) in grid coordinates; `depth` hidden ReLU layers."""

    def __init__(self, latent_dim: int = 2, width: int = 100, depth: int = 4):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = mlp([latent_dim] + [width] * depth + [2])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


@architecture
class PotentialPairDiscriminator(nn.Module):
    """Pair discriminator for a symmetric proposal: d(x, y) = b + (1 - b) sigmoid(f(x) - f(y)).

    For a symmetric q the MH ratio p(y) q(x | y) / (p(x) q(y | x)) is p(y) / p(x), a
    difference of potentials, and this form builds that in: since
    log sigmoid(u) - log sigmoid(-u) = u, the log ratio log d(y, x) - log d(x, y) equals
    f(y) - f(x) wherever d stays clear of its floor b, and lies in [log b, -log b]
    always (the implicit-MH bound's minorisation condition). A general pair network
    (`discriminators.architectures.PairDiscriminator`) must learn this antisymmetry
    from data; on the 25 Gaussians it stalls near ratio 1, while this one trains in a
    few thousand steps. f is an MLP over x with `depth` hidden ReLU layers.

    forward(x, y) returns log d(x, y), shape (B,), like every pair discriminator.
    """

    def __init__(self, input_dim: int = 2, width: int = 100, depth: int = 4, b: float = 1e-3):
        super().__init__()
        assert 0.0 < b < 1.0, "b must lie in (0, 1)"
        self.log_b = math.log(b)
        self.log_1mb = math.log1p(-b)
        self.potential = mlp([input_dim] + [width] * depth + [1])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        u = (self.potential(x.flatten(1)) - self.potential(y.flatten(1))).squeeze(-1)
        # log(b + (1 - b) sigmoid(u)), computed stably in log space.
        return torch.logaddexp(
            torch.full_like(u, self.log_b), self.log_1mb + nn.functional.logsigmoid(u)
        )
