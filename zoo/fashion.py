"""The Fashion-MNIST zoo models: a DCGAN, its discriminators and the FID classifier.

Every image here is a 1x28x28 float tensor in [0, 1] (zoo.data.load_fashion_mnist).

- `Generator`: DCGAN (Radford et al. 2016) for 28x28, z (B, latent_dim) -> 7x7 -> 14x14
  -> 28x28 by stride-2 transposed convs with batch norm, sigmoid output. Batch norm runs
  on its stored statistics in eval mode, so a sample depends on its own latent only.
- `Discriminator`: strided convs, one logit per image. The GAN's own D has batch norm
  (DCGAN; in eval mode it normalises with its stored statistics); the post-hoc D has
  none, and dropout before its head.
- `FashionClassifier`: a small conv net; `features(x)` is the penultimate layer, the fast
  FID feature space for Fashion-MNIST. `FashionFeatures` is the same network whose
  forward returns those features (the store's "features" model loads the classifier's
  weights file).

Training: `python -m zoo.train_fashion`; weights ship in zoo/store/fashion*.

Example:
    >>> g = Generator(latent_dim=64)
    >>> g.eval()(torch.randn(3, 64)).shape
    torch.Size([3, 1, 28, 28])
"""

from __future__ import annotations

import torch
from torch import nn

from architectures import architecture


@architecture
class Generator(nn.Module):
    """z -> (4w, 7, 7) -> (2w, 14, 14) -> (w, 28, 28) -> one channel; pixels in [0, 1]."""

    def __init__(self, latent_dim: int = 64, width: int = 64):
        super().__init__()
        self.latent_dim = latent_dim
        self.width = width
        self.project = nn.Sequential(
            nn.Linear(latent_dim, 4 * width * 7 * 7, bias=False),
            nn.BatchNorm1d(4 * width * 7 * 7),
            nn.ReLU(),
        )
        self.net = nn.Sequential(
            nn.ConvTranspose2d(4 * width, 2 * width, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 1, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(-1, 4 * self.width, 7, 7)  # (B, 4w, 7, 7)
        return self.net(h)


@architecture
class Discriminator(nn.Module):
    """28 -> 14 -> 7 by stride-2 convs, a 3x3 conv at 7x7, then a linear logit: (B,).

    batch_norm: after the second and third convs, as in DCGAN's discriminator (in eval
    mode, the stored statistics: a row's logit never depends on its batch). dropout:
    before the head, to regularise a post-hoc D.
    """

    def __init__(self, width: int = 64, dropout: float = 0.0, batch_norm: bool = False):
        super().__init__()
        norm = nn.BatchNorm2d if batch_norm else (lambda _: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 4, stride=2, padding=1),  # 28 -> 14
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),  # 14 -> 7
            norm(2 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),  # 7 -> 7
            norm(4 * width),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(4 * width * 7 * 7, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x))).squeeze(-1)


@architecture
class FashionClassifier(nn.Module):
    """Conv net for 1x28x28 images: forward gives logits (B, classes), `features` (B, F)."""

    def __init__(self, width: int = 32, feature_dim: int = 128, classes: int = 10):
        super().__init__()
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            _conv_block(1, width),
            _conv_block(width, width),
            nn.MaxPool2d(2),  # 28 -> 14
            _conv_block(width, 2 * width),
            _conv_block(2 * width, 2 * width),
            nn.MaxPool2d(2),  # 14 -> 7
            nn.Flatten(),
            nn.Linear(2 * width * 7 * 7, feature_dim),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, feature_dim): the fast FID feature space."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


@architecture
class FashionFeatures(FashionClassifier):
    """The classifier read at its penultimate layer: forward(x) -> (B, feature_dim).

    Same parameters as `FashionClassifier`, so it loads the classifier's weights file.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _conv_block(fan_in: int, fan_out: int) -> nn.Sequential:
    """3x3 conv, batch norm, ReLU (the classifier only: it is never used inside a chain)."""
    return nn.Sequential(
        nn.Conv2d(fan_in, fan_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(fan_out),
        nn.ReLU(),
    )
