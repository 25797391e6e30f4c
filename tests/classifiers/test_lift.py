"""Lifting uploaded torch.export classifiers into plain networks, and block networks."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from architectures import build, save_weights
from classifiers.block_rewrite import to_block_net
from classifiers.compress import BlockNet
from classifiers.lift import lift
from classifiers.lifted import LiftedNet
from tests.classifiers.conftest import export


def inputs(n: int = 16, shape=(1, 8, 8), seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def randomise_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters away from their defaults."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.3)
                module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
                module.weight.copy_(0.5 + torch.rand(size, generator=generator))
                module.bias.copy_(torch.randn(size, generator=generator) * 0.3)
    return model.eval()


def saved_and_rebuilt(net: nn.Module, tmp_path) -> nn.Module:
    save_weights(net, tmp_path / "weights.safetensors")
    return build("classifiers.lifted:LiftedNet", net.config, tmp_path / "weights.safetensors")


@pytest.mark.parametrize("decomposed", [False, True], ids=["training-ir", "core-aten"])
def test_lifted_lenet_reproduces_the_program_and_saves_as_a_zoo_model(
    user_classifier, decomposed, tmp_path
):
    program = user_classifier.program
    if decomposed:  # what a user gets after run_decompositions(): convolution, addmm, ...
        program = program.run_decompositions()
    net = lift(program, [1, 8, 8])
    assert isinstance(net, LiftedNet)
    kinds = [spec["kind"] for spec in net.config["layers"]]
    assert kinds == ["conv", "batch_norm", "relu", "max_pool", "conv", "batch_norm", "relu",
                     "flatten", "linear", "batch_norm", "relu", "linear"]  # fmt: skip
    x = inputs()
    with torch.no_grad():
        expected = program.module()(x)
        assert (net(x) - expected).abs().max() < 1e-5
        rebuilt = saved_and_rebuilt(net, tmp_path)
        assert torch.equal(rebuilt(x), net(x))


def test_lenet_becomes_a_block_network_with_batch_norm_folded(user_classifier):
    net = lift(user_classifier.program, [1, 8, 8])
    blocks = to_block_net(net)
    assert isinstance(blocks, BlockNet)
    assert [block.units for block in blocks.blocks] == [20, 50, 800, 500]
    assert not any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in blocks.modules())
    x = inputs()
    with torch.no_grad():
        assert (blocks(x) - user_classifier.module(x)).abs().max() < 1e-4


class FunctionalNet(nn.Module):
    """Input normalisation, 'same' padding, GELU, functional pooling, a mean over (H, W),
    a view with the symbolic batch, matmul plus bias and a final log_softmax."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding="same")
        self.weight = nn.Parameter(torch.randn(10, 6))
        self.bias = nn.Parameter(torch.randn(10))

    def forward(self, x):
        x = (x - 0.5) / 0.25
        y = F.max_pool2d(F.gelu(self.conv(x)), 2)
        y = F.avg_pool2d(y, 3, stride=1, padding=1, count_include_pad=False)
        y = y.mean((2, 3), keepdim=True)
        y = y.view(y.size(0), -1)
        return F.log_softmax(torch.matmul(y, self.weight.t()) + self.bias, dim=1)


def test_functional_forms_and_input_scaling_are_lifted():
    model = FunctionalNet().eval()
    program = export(model)
    for variant in (program, program.run_decompositions()):
        net = lift(variant, [1, 8, 8])
        kinds = [spec["kind"] for spec in net.config["layers"]]
        assert kinds[0] == "affine" and kinds[-2:] == ["linear", "log_softmax"]
        x = inputs()
        with torch.no_grad():
            assert (net(x) - model(x)).abs().max() < 1e-5


def test_vector_inputs_and_batch_norm_between_layers_fold_into_a_block_network():
    model = nn.Sequential(
        nn.BatchNorm1d(20), nn.Linear(20, 32), nn.ReLU(), nn.BatchNorm1d(32), nn.Linear(32, 3)
    )
    model = randomise_batch_norms(model)
    net = lift(export(model, (20,)), [20])
    blocks = to_block_net(net)
    assert blocks.input_shape == (20,) and [b.units for b in blocks.blocks] == [20, 32]
    x = inputs(shape=(20,))
    with torch.no_grad():
        assert (net(x) - model(x)).abs().max() < 1e-5
        assert (blocks(x) - model(x)).abs().max() < 1e-4


def test_global_average_pooling_folds_into_the_first_dense_layer():
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.MaxPool2d(2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10), nn.LogSoftmax(1),
    )  # fmt: skip
    model = randomise_batch_norms(model)
    blocks = to_block_net(lift(export(model), [1, 8, 8]))
    assert blocks.dropped_log_softmax
    assert [spec["kind"] for spec in blocks.block_specs] == ["conv", "dense"]
    x = inputs()
    with torch.no_grad():
        assert (blocks(x).softmax(-1) - model(x).exp()).abs().max() < 1e-5


def test_exported_program_round_trip_still_lifts(user_classifier):
    buffer = io.BytesIO()
    torch.export.save(user_classifier.program, buffer)
    program = torch.export.load(io.BytesIO(buffer.getvalue()))
    net = lift(program, [1, 8, 8])
    x = inputs()
    with torch.no_grad():
        assert (net(x) - user_classifier.module(x)).abs().max() < 1e-5


class MixedForms(nn.Module):
    """Buffers for input scaling (one not persistent), a bias added by hand, BN without
    affine, ReLU6, Dropout2d, Identity, LeakyReLU, ceil-mode average pooling, SiLU
    (x * sigmoid(x) once decomposed), squeeze, a scalar multiple, tanh and sigmoid."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.3]).view(1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.2]).view(1, 1, 1, 1))
        self.conv = nn.Conv2d(1, 6, 3, bias=False)
        self.bias = nn.Parameter(torch.randn(6))
        self.bn = nn.BatchNorm2d(6, affine=False)
        self.features = nn.Sequential(
            nn.ReLU6(), nn.Dropout2d(0.1), nn.Identity(), nn.Conv2d(6, 8, 3, padding=1),
            nn.LeakyReLU(0.1), nn.AvgPool2d(2, ceil_mode=True), nn.SiLU(),
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Sigmoid(), nn.Linear(12, 4)
        )

    def forward(self, x):
        x = (x - self.mean) / self.std
        x = self.features(self.bn(self.conv(x) + self.bias.view(1, -1, 1, 1)))
        return self.head(2.0 * F.adaptive_avg_pool2d(x, 1).squeeze())


def test_mixed_module_forms_are_lifted_in_both_graph_forms(tmp_path):
    model = MixedForms()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    program = export(model.eval())
    x = inputs()
    for variant in (program, program.run_decompositions()):
        net = lift(variant, [1, 8, 8])
        assert "silu" in [spec["kind"] for spec in net.config["layers"]]
        with torch.no_grad():
            assert (net(x) - model(x)).abs().max() < 1e-5
            assert torch.equal(saved_and_rebuilt(net, tmp_path)(x), net(x))
