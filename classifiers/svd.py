"""Sparse Variational Dropout (Molchanov et al., 2017): the unstructured pruning baseline.

Every weight w gets q(w) = N(theta, sigma^2) with alpha = sigma^2 / theta^2, a log-uniform
prior, and the KL approximation

    -KL ~= k1 sigmoid(k2 + k3 log alpha) - log(1 + 1/alpha) / 2 - k1,
    k1, k2, k3 = 0.63576, 1.87320, 1.48695.

Training uses the local reparameterisation trick (noise on pre-activations, log sigma^2
parameterised directly); a weight is kept iff log alpha < 3. The result is a dense network
whose weight tensors are mostly zero: its FLOPs fall only with sparse kernels, so on a
CPU with dense kernels it runs as fast as the original. Units that lost every weight can
still be sliced out (`slice_empty_units`), which is the structured by-product the SBP
thesis reports for SparseVD.

Usage:
    noisy = train_svd(pretrained, x_train, y_train, epochs=60)
    sparse, report = sparsify(noisy)         # plain BlockNet with zeros, and counts
    smaller = slice_empty_units(sparse)      # drop channels / inputs with no weight left
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from classifiers.compress import (
    BlockNet,
    ConvBlock,
    count_flops,
    layer_names,
    slice_units,
    unit_counts,
)
from classifiers.sbp import fit

K1, K2, K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_THRESHOLD = 3.0
INIT_LOG_SIGMA2 = -10.0


def kl_approximation(log_alpha: torch.Tensor) -> torch.Tensor:
    """Per-weight KL(q || log-uniform prior), the Molchanov et al. approximation."""
    negative_kl = K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * F.softplus(-log_alpha) - K1
    return -negative_kl


class _SparseVariational(nn.Module):
    """Shared parts: theta (the weight), log sigma^2, log alpha and the keep mask."""

    def _init_variational(self, weight: torch.Tensor) -> None:
        self.weight = nn.Parameter(weight.detach().clone())
        self.log_sigma2 = nn.Parameter(torch.full_like(self.weight, INIT_LOG_SIGMA2))

    def log_alpha(self) -> torch.Tensor:
        log_alpha = self.log_sigma2 - torch.log(self.weight**2 + 1e-8)
        return log_alpha.clamp(-10.0, 10.0)

    def kl(self) -> torch.Tensor:
        return kl_approximation(self.log_alpha()).sum()

    def mask(self) -> torch.Tensor:
        return self.log_alpha() < LOG_ALPHA_THRESHOLD

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask()


class SVDLinear(_SparseVariational):
    """Drop-in for the nn.Linear of a DenseBlock (bias stays a point estimate)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self._init_variational(linear.weight)
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, self.masked_weight(), self.bias)
        mean = F.linear(x, self.weight, self.bias)
        variance = F.linear(x * x, torch.exp(self.log_sigma2))
        return mean + torch.sqrt(variance + 1e-8) * torch.randn_like(mean)


class SVDConv2d(_SparseVariational):
    """Drop-in for the bias-free nn.Conv2d of a ConvBlock."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self._init_variational(conv.weight)
        self.padding = conv.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.conv2d(x, self.masked_weight(), padding=self.padding)
        mean = F.conv2d(x, self.weight, padding=self.padding)
        variance = F.conv2d(x * x, torch.exp(self.log_sigma2), padding=self.padding)
        return mean + torch.sqrt(variance + 1e-8) * torch.randn_like(mean)


def svd_layers(model: nn.Module) -> list[_SparseVariational]:
    return [m for m in model.modules() if isinstance(m, _SparseVariational)]


def add_svd(model: BlockNet) -> BlockNet:
    """A copy of a plain BlockNet whose conv and linear weights are sparse-VD variational."""
    if not isinstance(model, BlockNet):
        raise ValueError(f"sparse VD layers go into a BlockNet, got {type(model).__name__}")
    if svd_layers(model) or any(block.sbp is not None for block in model.blocks):
        raise ValueError("the model already has noise layers")
    noisy = copy.deepcopy(model)
    for block in noisy.blocks:
        if isinstance(block, ConvBlock):
            block.conv = SVDConv2d(block.conv)
        else:
            block.linear = SVDLinear(block.linear)
    return noisy


def kl_divergence(model: nn.Module) -> torch.Tensor:
    return torch.stack([layer.kl() for layer in svd_layers(model)]).sum()


def train_svd(
    model: BlockNet,
    x,
    y,
    *,
    kl_weight: float = 1.0,
    epochs: int = 60,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> BlockNet:
    """Fine-tune a pretrained BlockNet with sparse VD; loss N * mean(CE) + kl_weight * KL."""
    noisy = model if svd_layers(model) else add_svd(model)
    fit(
        noisy,
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        penalty=kl_divergence,
        kl_weight=kl_weight,
        seed=seed,
        log=log,
    )
    return noisy.eval()


@dataclass
class SparsityReport:
    layers: list[str]
    weights: list[int]  # conv / linear weights per layer
    nonzero: list[int]  # of which kept (log alpha < 3)
    units_before: list[int]  # conv output channels, dense input features
    units_after: list[int]  # of which still have a nonzero weight
    params_before: int  # all weights and biases
    params_after: int  # nonzero weights plus biases
    flops: int  # with dense kernels: unchanged
    flops_nonzero: int  # with ideal sparse kernels

    @property
    def sparsity(self) -> float:
        return 1 - sum(self.nonzero) / sum(self.weights)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sparsity": self.sparsity}


def _live_units(block: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(block, ConvBlock):
        return weight.flatten(1).ne(0).any(1)  # output channels
    return weight.ne(0).any(0)  # input features


@torch.no_grad()
def sparsify(model: BlockNet) -> tuple[BlockNet, SparsityReport]:
    """The plain BlockNet with every weight of log alpha >= 3 set to zero, and its counts."""
    layers = svd_layers(model)
    if len(layers) != len(model.blocks):
        raise ValueError("expected a network from add_svd / train_svd")
    plain = BlockNet(**model.block_config)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("log_sigma2"):
            continue
        state[key] = value
    for i, block in enumerate(model.blocks):
        layer = block.conv if isinstance(block, ConvBlock) else block.linear
        name = "conv" if isinstance(block, ConvBlock) else "linear"
        state[f"blocks.{i}.{name}.weight"] = layer.masked_weight()
    plain.load_state_dict(state)
    plain = plain.to(next(model.parameters()).device).eval()
    weights, nonzero, live = [], [], []
    for layer, block in zip(layers, model.blocks, strict=True):
        masked = layer.masked_weight()
        weights.append(masked.numel())
        nonzero.append(int(masked.ne(0).sum()))
        live.append(int(_live_units(block, masked).sum()))
    biases = sum(p.numel() for n, p in plain.named_parameters() if not n.endswith("weight"))
    flops = count_flops(plain)
    report = SparsityReport(
        layers=layer_names(plain),
        weights=weights,
        nonzero=nonzero,
        units_before=unit_counts(plain),
        units_after=live,
        params_before=sum(weights) + biases,
        params_after=sum(nonzero) + biases,
        flops=flops,
        flops_nonzero=round(flops * _nonzero_flop_fraction(plain)),
    )
    return plain, report


def _nonzero_flop_fraction(plain: BlockNet) -> float:
    """Share of multiply-adds whose weight is nonzero (each weight is used at a layer's
    every output position, so layer FLOPs scale with its nonzero share)."""
    total = kept = 0.0
    for block, shape in zip(plain.blocks, plain.block_input_shapes(), strict=True):
        weight = block.conv.weight if isinstance(block, ConvBlock) else block.linear.weight
        if isinstance(block, ConvBlock):
            _, height, width = block.output_shape(shape)
            positions = height * block.pool * width * block.pool
        else:
            positions = 1
        total += weight.numel() * positions
        kept += int(weight.ne(0).sum()) * positions
    return kept / total


def slice_empty_units(sparse: BlockNet) -> BlockNet:
    """Slice out conv channels and dense inputs without a nonzero weight (exact)."""
    keep = []
    for block in sparse.blocks:
        weight = block.conv.weight if isinstance(block, ConvBlock) else block.linear.weight
        live = _live_units(block, weight.detach()).cpu()
        if not live.any():
            live[0] = True
        keep.append(live)
    return slice_units(sparse, keep, [torch.ones(k.numel()) for k in keep])
