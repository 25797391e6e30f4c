"""Sparse variational dropout baseline: KL approximation, masking and sparsification."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import integrate

from classifiers import svd
from zoo.data import load_digits_split
from zoo.digits_sbp import DigitsLeNet5, DigitsMLP


def exact_kl(log_alpha: float) -> float:
    """KL(N(theta, alpha theta^2) || log-uniform) = -log(alpha)/2 + E log|1 + sqrt(alpha) z|
    + (gamma + log 2)/2, the constant making it vanish as alpha -> infinity."""
    root = math.exp(log_alpha / 2)

    def integrand(z: float) -> float:
        return math.log(abs(1 + root * z)) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the log singularity at z = -1/root is integrable
        expectation = integrate.quad(integrand, -40, 40, points=[-1 / root], limit=500)[0]
    return -0.5 * log_alpha + expectation + (np.euler_gamma + math.log(2)) / 2


def test_kl_approximation_is_within_a_hundredth_of_the_exact_kl():
    for log_alpha in np.linspace(-6, 6, 25):
        approx = svd.kl_approximation(torch.tensor(log_alpha)).item()
        assert approx == pytest.approx(exact_kl(log_alpha), abs=0.01), log_alpha
    assert svd.kl_approximation(torch.tensor(10.0)).item() == pytest.approx(0.0, abs=1e-4)


def noisy_lenet(seed: int = 0):
    torch.manual_seed(seed)
    model = svd.add_svd(DigitsLeNet5(conv1=6, conv2=8, dense=32))
    with torch.no_grad():  # about half the weights above the log alpha threshold
        for layer in svd.svd_layers(model):
            coin = torch.rand(layer.weight.shape) < 0.5
            layer.log_sigma2.copy_(torch.where(coin, 2.0, -12.0))
            layer.weight.mul_(3.0)
        model.blocks[0].conv.log_sigma2[0] = 5.0  # a whole conv channel pruned
    return model.eval()


def test_eval_uses_masked_weights_and_training_is_noisy():
    model = noisy_lenet()
    layer = model.blocks[2].linear
    x = torch.rand(4, layer.weight.shape[1])
    expected = x @ (layer.weight * (layer.log_alpha() < 3)).T + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_sparsified_network_matches_and_counts_are_consistent():
    model = noisy_lenet()
    sparse, report = svd.sparsify(model)
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sparse(x), model(x), atol=1e-5)
    assert not svd.svd_layers(sparse)
    assert 0.4 < report.sparsity < 0.6
    assert report.params_after < report.params_before
    assert report.flops_nonzero < report.flops
    assert report.units_after[0] == report.units_before[0] - 1
    smaller = svd.slice_empty_units(sparse)
    assert torch.allclose(smaller(x), sparse(x), atol=1e-5)
    assert smaller.blocks[0].conv.out_channels == report.units_after[0]


def test_train_svd_sparsifies_a_pretrained_mlp():
    split = load_digits_split()
    x, y = (
        torch.from_numpy(split.x_train[:256].copy()),
        torch.from_numpy(split.y_train[:256].copy()),
    )
    torch.manual_seed(0)
    noisy = svd.train_svd(DigitsMLP(hidden=[32, 16]), x, y, epochs=4, lr=1e-2, seed=0)
    _, report = svd.sparsify(noisy)
    assert report.sparsity > 0.2
    with pytest.raises(ValueError):
        svd.add_svd(noisy)
