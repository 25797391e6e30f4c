"""The digits demo models: a small DCGAN on scikit-learn's 8x8 digits, and its helpers.

Every image here is a 1x8x8 float tensor in [0, 1] (zoo.data.load_digits_split).

- `Generator`: DCGAN-style, z (B, latent_dim) -> (B, 1, 8, 8), sigmoid output.
  Its sample discriminators are `discriminators.architectures.ConvDiscriminator`.
- `DigitClassifier`: a small conv net; `features(x)` is the penultimate layer, the
  digits FID feature space. `DigitFeatures` is the same network whose forward returns
  those features (the store's "features" model loads the classifier's weights).
- `Proposal`: a learned conditional proposal for the Markov sampler,
  q(x | y) = G(sqrt(1 - rho^2) E(y) + rho xi), xi ~ N(0, I), with E an encoder trained
  to invert the frozen G. It holds both E and G, so forward(y, noise) is self-contained.

Training: `python -m zoo.train_digits`; weights ship in zoo/store/digits*.

Example:
    >>> g = Generator(latent_dim=16)
    >>> g(torch.randn(3, 16)).shape
    torch.Size([3, 1, 8, 8])
"""

from __future__ import annotations

import math

import torch
from torch import nn

from architectures import architecture


@architecture
class Generator(nn.Module):
    """z -> 2x2 -> 4x4 -> 8x8 by stride-2 transposed convs; pixels in [0, 1]."""

    def __init__(self, latent_dim: int = 16, width: int = 64):
        super().__init__()
        self.latent_dim = latent_dim
        self.width = width
        self.project = nn.Linear(latent_dim, 2 * width * 2 * 2)
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),  # 2x2 -> 4x4
            nn.ReLU(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1),  # 4x4 -> 8x8
            nn.ReLU(),
            nn.Conv2d(width, 1, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(-1, 2 * self.width, 2, 2)  # (B, 2w, 2, 2)
        return self.net(h)


@architecture
class DigitClassifier(nn.Module):
    """Conv net for 1x8x8 digits: forward gives logits (B, classes), `features` (B, F)."""

    def __init__(self, width: int = 32, feature_dim: int = 64, classes: int = 10):
        super().__init__()
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
            nn.Flatten(),
            nn.Linear(2 * width * 4, feature_dim),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, feature_dim): the digits FID feature space."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


@architecture
class DigitFeatures(DigitClassifier):
    """The digit classifier read at its penultimate layer: forward(x) -> (B, feature_dim).

    Same parameters as `DigitClassifier`, so it loads the classifier's weights file.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@architecture
class Encoder(nn.Module):
    """x (B, 1, 8, 8) -> z (B, latent_dim): trained to invert a frozen `Generator`."""

    def __init__(self, latent_dim: int = 16, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 4, stride=2, padding=1),  # 8x8 -> 4x4
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),  # 4x4 -> 2x2
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(2 * width * 4, 256),
            nn.LeakyReLU(0.2),
            nn.Linear(256, latent_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@architecture
class Proposal(nn.Module):
    """q(x | y) = G(sqrt(1 - rho^2) E(y) + rho * noise): forward(y, noise) -> x.

    noise is (B, latent_dim) standard normal (the manifest's noise_dim). rho in (0, 1]
    sets the step: rho = 1 is the independent proposal G(noise); small rho stays close
    to y's latent code. When E inverts G and E(y) ~ N(0, I), the latent move is the
    prior-preserving Crank-Nicolson step.
    """

    def __init__(
        self, latent_dim: int = 16, width: int = 64, encoder_width: int = 64, rho: float = 0.5
    ):
        super().__init__()
        assert 0.0 < rho <= 1.0, "rho must lie in (0, 1]"
        self.rho = rho
        self.keep = math.sqrt(1.0 - rho**2)
        self.encoder = Encoder(latent_dim, encoder_width)
        self.generator = Generator(latent_dim, width)

    def forward(self, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.generator(self.keep * self.encoder(y) + self.rho * noise)
