"""Compression of SBP networks into smaller plain ones, prediction and training."""

from __future__ import annotations

import pytest
import torch

from architectures import build, save_weights
from classifiers import sbp
from classifiers.common import Prediction
from classifiers.compress import BlockNet, count_flops, count_params, measure_speedup
from zoo.data import load_digits_split
from zoo.digits_sbp import DigitsLeNet5, DigitsMLP


def lenet_with_bn() -> BlockNet:
    blocks = [
        {"kind": "conv", "in_channels": 1, "out_channels": 12, "pool": 2, "batch_norm": True},
        {"kind": "conv", "in_channels": 12, "out_channels": 16, "batch_norm": True},
        {"kind": "dense", "in_features": 16 * 16, "out_features": 40},
        {"kind": "dense", "in_features": 40, "out_features": 10, "relu": False},
    ]
    return BlockNet([1, 8, 8], blocks)


def randomise(model: BlockNet, seed: int) -> BlockNet:
    """Random weights, positive biases (removed channels emit nonzero constants), random
    BN statistics, and SBP parameters that prune about half the units."""
    generator = torch.Generator().manual_seed(seed)
    model = sbp.add_sbp(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("sbp.mu"):
                param.copy_(-0.5 * torch.rand(param.shape, generator=generator))
            elif name.endswith("sbp.log_sigma"):
                param.copy_(torch.where(noise > 0, 3.0, -3.0 + noise.abs()))
            elif name.endswith("bias"):
                param.copy_(0.5 * noise.abs())
            else:
                param.copy_(2 * noise / max(1, param[0].numel()) ** 0.5)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(
                    0.3 * torch.randn(module.num_features, generator=generator)
                )
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))
    return model.eval()


def inputs(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [lenet_with_bn, DigitsLeNet5, DigitsMLP])
def test_compressed_network_equals_masked_sbp_network(make, tmp_path):
    model = randomise(make(), seed=0)
    small, report = sbp.compress(model)
    x = inputs()
    expected = model(x)
    assert (small(x) - expected).abs().max() < 1e-5
    assert not sbp.sbp_layers(small)
    assert report.units_after == [int(block.sbp.mask().sum()) for block in model.blocks]
    pairs = zip(report.units_after, report.units_before, strict=True)
    assert all(0 < after < before for after, before in pairs)
    assert report.params_after == count_params(small) < count_params(model)
    assert report.flops_after == count_flops(small) < report.flops_before
    # a plain architecture whose config carries the widths: it rebuilds from safetensors
    save_weights(small, tmp_path / "weights.safetensors")
    rebuilt = build("classifiers.compress:BlockNet", small.config, tmp_path / "weights.safetensors")
    assert torch.equal(rebuilt(x), small(x))


def test_removed_conv_channels_fold_into_offsets_and_biases():
    model = randomise(lenet_with_bn(), seed=1)
    small, _ = sbp.compress(model)
    assert small.blocks[1].offset is not None  # padded conv: a per-position map
    assert small.blocks[2].index is not None  # dense inputs picked from kept channels


def test_channel_whose_features_are_all_pruned_is_dropped():
    model = randomise(lenet_with_bn(), seed=2)
    conv2, dense1 = model.blocks[1].sbp, model.blocks[2].sbp
    kept = int(torch.nonzero(conv2.mask())[0])
    with torch.no_grad():
        dense1.log_sigma[kept * 16 : (kept + 1) * 16] = 5.0  # none of its 16 features read
    small, report = sbp.compress(model)
    assert report.widths_after[1] == report.units_after[1] - 1
    x = inputs()
    assert (small(x) - model(x)).abs().max() < 1e-5


def test_pruning_keeps_one_unit_when_every_snr_is_below_one():
    model = randomise(DigitsLeNet5(), seed=3)
    with torch.no_grad():
        model.blocks[0].sbp.log_sigma.fill_(5.0)
        model.blocks[3].sbp.log_sigma.fill_(5.0)
    small, report = sbp.compress(model)
    assert report.units_after[0] == 1 and report.units_after[3] == 1
    x = inputs()
    assert (small(x) - model(x)).abs().max() < 1e-5


def test_compress_rejects_networks_without_sbp_layers():
    with pytest.raises(ValueError):
        sbp.compress(DigitsMLP())
    with pytest.raises(ValueError):
        sbp.compress(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError):
        sbp.add_sbp(sbp.add_sbp(DigitsMLP()))


def test_predict_returns_a_deterministic_prediction_and_validates_inputs():
    model = randomise(DigitsLeNet5(), seed=4)
    prediction = sbp.predict(model, inputs(8))
    assert isinstance(prediction, Prediction)
    assert torch.allclose(prediction.probs.sum(-1), torch.ones(8))
    assert torch.equal(prediction.label, prediction.probs.argmax(-1))
    assert torch.equal(prediction.mutual_information, torch.zeros(8))
    assert torch.equal(sbp.predict(model, inputs(8)).probs, prediction.probs)
    for bad in (torch.rand(8, 64), torch.rand(0, 1, 8, 8), torch.full((2, 1, 8, 8), float("nan"))):
        with pytest.raises(ValueError):
            sbp.predict(model, bad)
    with pytest.raises(ValueError):
        sbp.predict(model, torch.ones(2, 1, 8, 8, dtype=torch.long))


def test_train_sbp_is_seeded_and_moves_towards_the_prior():
    split = load_digits_split()
    x, y = (
        torch.from_numpy(split.x_train[:256].copy()),
        torch.from_numpy(split.y_train[:256].copy()),
    )
    torch.manual_seed(0)
    pretrained = DigitsMLP(hidden=[32, 16])
    before = sbp.kl_divergence(sbp.add_sbp(pretrained)).item()
    runs = [
        sbp.train_sbp(pretrained, x, y, epochs=3, batch_size=64, lr=3e-3, seed=7) for _ in range(2)
    ]
    assert not sbp.sbp_layers(pretrained)  # the pretrained network is left alone
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(a, b)
    assert sbp.kl_divergence(runs[0]).item() < before
    with pytest.raises(ValueError):
        sbp.train_sbp(pretrained, x, y[:10], epochs=1)
    with pytest.raises(ValueError):
        sbp.train_sbp(pretrained, x, y, epochs=0)


def test_measure_speedup_reports_both_batch_sizes():
    model = randomise(DigitsMLP(hidden=[64, 32]), seed=5)
    small, _ = sbp.compress(model)
    timings = measure_speedup(model, small, (1, 8, 8), (1, 16), repeats=3, min_seconds=0.001)
    assert set(timings) == {"1", "16"}
    assert all(t["speedup"] > 0 and t["original_per_s"] > 0 for t in timings.values())
