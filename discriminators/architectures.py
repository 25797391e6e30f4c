"""Discriminator networks. Every one returns a logit per row, shape (B,).

- `MLPDiscriminator`: vectors, e.g. the 25-Gaussians grid.
- `ConvDiscriminator`: DCGAN-style (strided convs, LeakyReLU, no pooling) for small
  square images such as the 1x8x8 digits.
- `PairDiscriminator`: d(x, y) in [b, 1] for implicit MH with a Markov proposal; its
  forward returns log d(x, y), shape (B,).

All are plain nn.Modules that `torch.export` can trace with a dynamic batch dimension.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from architectures import architecture


def mlp(sizes: list[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers with `activation` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


@architecture
class MLPDiscriminator(nn.Module):
    """`depth` hidden ReLU layers of `width` units, then a logit."""

    def __init__(self, input_dim: int = 2, width: int = 100, depth: int = 4):
        super().__init__()
        self.net = mlp([input_dim] + [width] * depth + [1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1)).squeeze(-1)


@architecture
class ConvDiscriminator(nn.Module):
    """DCGAN-style: stride-2 convs halve the side until it is 2, then a linear logit."""

    def __init__(self, channels: int = 1, size: int = 8, width: int = 64):
        super().__init__()
        assert size >= 4 and size & (size - 1) == 0, "size must be a power of two >= 4"
        layers: list[nn.Module] = []
        fan_in, fan_out = channels, width
        for _ in range(int(math.log2(size)) - 1):  # side: size -> 2
            layers += [nn.Conv2d(fan_in, fan_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            fan_in, fan_out = fan_out, fan_out * 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(fan_in * 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1)).squeeze(-1)


@architecture
class PairDiscriminator(nn.Module):
    """log d(x, y) with d = b + (1 - b) * sigmoid(h(x, y)), so d lies in [b, 1].

    h is an MLP over the concatenation [x, y, x - y] of the flattened inputs; the
    lower bound b keeps the MH ratio d(x, y) / d(y, x) within [b, 1 / b] (the
    minorisation condition of the implicit-MH bound).
    """

    def __init__(self, input_dim: int = 64, width: int = 256, depth: int = 3, b: float = 1e-3):
        super().__init__()
        assert 0.0 < b < 1.0, "b must lie in (0, 1)"
        self.log_b = math.log(b)
        self.log_1mb = math.log1p(-b)
        self.net = mlp([3 * input_dim] + [width] * depth + [1], activation=nn.SiLU)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = x.flatten(1), y.flatten(1)
        h = self.net(torch.cat([x, y, x - y], dim=1)).squeeze(-1)
        # log(b + (1 - b) sigmoid(h)), computed stably in log space.
        return torch.logaddexp(
            torch.full_like(h, self.log_b), self.log_1mb + nn.functional.logsigmoid(h)
        )
