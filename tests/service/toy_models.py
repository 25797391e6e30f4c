"""Small models written as a model store, the way a user brings their own GAN.

Every network is a torch.export program with a dynamic batch dimension, except one
zoo-format generator (architecture name plus safetensors weights). Weights come from
fixed seeds; nothing is trained: the tests check the service, not the models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from architectures import save_weights
from discriminators.calibration import fit_and_report, save_calibration
from evaluation.stats import save_stats
from zoo.toy25 import Generator as Toy25Generator

BATCH = torch.export.Dim("batch")


class MLP(nn.Module):
    def __init__(self, sizes: list[int], out_shape: tuple[int, ...] = (), squash=False):
        super().__init__()
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
        self.net = nn.Sequential(*layers[:-1])
        self.out_shape, self.squash = out_shape, squash

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x.flatten(1))
        out = torch.sigmoid(out) if self.squash else out
        return out.reshape(x.shape[0], *self.out_shape)


class Pair(nn.Module):
    """log d(x, y) = logsigmoid(h([x, y]))."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = MLP([2 * dim, 16, 1])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.logsigmoid(self.net(torch.cat([x, y], 1)))


class Conditional(nn.Module):
    """x = y + 0.3 * tanh(f([y, noise]))."""

    def __init__(self, dim: int, noise_dim: int):
        super().__init__()
        self.net = MLP([dim + noise_dim, 16, dim], out_shape=(dim,))

    def forward(self, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return y + 0.3 * torch.tanh(self.net(torch.cat([y, noise], 1)))


def export(module: nn.Module, *example: torch.Tensor) -> torch.export.ExportedProgram:
    torch.manual_seed(0)
    shapes = tuple({0: BATCH} for _ in example)
    return torch.export.export(module.eval(), example, dynamic_shapes=shapes)


def write(store: Path, name: str, manifest: dict, files: dict | None = None) -> Path:
    folder = store / name / "1"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for file_name, program in (files or {}).items():
        torch.export.save(program, str(folder / file_name))
    return folder


def seeded(cls, *args, **kwargs) -> nn.Module:
    torch.manual_seed(len(args) + 7)
    return cls(*args, **kwargs)


def build_store(store: Path) -> Path:
    """toy (2-D), toy-d, toy-pair, toy-prop, toy-pair-cond, toy-zoo, img, img-d, img-features,
    and two folders that must be skipped: broken (bad JSON) and pickled (a pickle as .pt2)."""
    z2, x2 = torch.randn(4, 2), torch.randn(4, 2)
    toy = write(store, "toy", {
        "kind": "generator", "format": "torch.export", "file": "generator.pt2",
        "latent_dim": 2, "sample_shape": [2], "discriminator": "toy-d",
        "real_samples": "real.safetensors", "description": "2-D test generator",
    }, {"generator.pt2": export(seeded(MLP, [2, 16, 2], (2,)), z2)})  # fmt: skip
    save_file({"x": torch.randn(64, 2) * 0.5 + 1.0}, str(toy / "real.safetensors"))
    discriminator = seeded(MLP, [2, 16, 1])
    folder = write(store, "toy-d", {
        "kind": "discriminator", "format": "torch.export", "file": "discriminator.pt2",
        "generator": "toy", "input": "sample", "output": "logit",
        "calibration": "calibration.json",
    }, {"discriminator.pt2": export(discriminator, x2)})  # fmt: skip
    with torch.no_grad():
        raw_real = discriminator(torch.randn(400, 2) + 0.5).reshape(-1)
        raw_fake = discriminator(torch.randn(400, 2)).reshape(-1)
    calibrators, report = fit_and_report(raw_real, raw_fake)
    save_calibration(folder / "calibration.json", calibrators, report)
    write(store, "toy-pair", {
        "kind": "discriminator", "format": "torch.export", "file": "pair.pt2",
        "generator": "toy", "input": "pair", "proposal": {"type": "gaussian", "scale": 0.2},
    }, {"pair.pt2": export(seeded(Pair, 2), x2, x2)})  # fmt: skip
    write(store, "toy-prop", {
        "kind": "proposal", "format": "torch.export", "file": "proposal.pt2",
        "generator": "toy", "noise_dim": 3,
    }, {"proposal.pt2": export(seeded(Conditional, 2, 3), x2, torch.randn(4, 3))})  # fmt: skip
    write(store, "toy-pair-cond", {
        "kind": "discriminator", "format": "torch.export", "file": "pair.pt2",
        "generator": "toy", "input": "pair", "output": "log_d", "proposal": "toy-prop",
    }, {"pair.pt2": export(seeded(Pair, 2), x2, x2)})  # fmt: skip
    folder = write(store, "toy-zoo", {
        "kind": "generator", "format": "zoo", "architecture": "zoo.toy25:Generator",
        "config": {"latent_dim": 2, "width": 8, "depth": 1}, "weights": "weights.safetensors",
        "latent_dim": 2, "sample_shape": [2],
    })  # fmt: skip
    save_weights(seeded(Toy25Generator, 2, 8, 1), folder / "weights.safetensors")
    image = write(store, "img", {
        "kind": "generator", "format": "torch.export", "file": "generator.pt2",
        "latent_dim": 4, "sample_shape": [1, 8, 8], "discriminator": "img-d",
        "value_range": [0.0, 1.0], "reference_stats": "reference.npz",
        "features": "img-features",
    }, {"generator.pt2": export(seeded(MLP, [4, 32, 64], (1, 8, 8), squash=True),
                                torch.randn(4, 4))})  # fmt: skip
    write(store, "img-d", {
        "kind": "discriminator", "format": "torch.export", "file": "discriminator.pt2",
        "generator": "img",
    }, {"discriminator.pt2": export(seeded(MLP, [64, 16, 1]), torch.rand(4, 1, 8, 8))})  # fmt: skip
    features = seeded(MLP, [64, 8], (8,))
    write(store, "img-features", {
        "kind": "features", "format": "torch.export", "file": "features.pt2", "feature_dim": 8,
    }, {"features.pt2": export(features, torch.rand(4, 1, 8, 8))})  # fmt: skip
    with torch.no_grad():
        reference = features(torch.rand(500, 1, 8, 8)).double().numpy()
    save_stats(image / "reference.npz", reference.mean(0), np.cov(reference, rowvar=False))
    # Broken folders a server must skip (and list) without failing to start.
    (store / "broken" / "1").mkdir(parents=True)
    (store / "broken" / "1" / "manifest.json").write_text('{"kind": "generator", ')
    write(store, "pickled", {
        "kind": "generator", "format": "torch.export", "file": "generator.pt2",
        "latent_dim": 2, "sample_shape": [2],
    })  # fmt: skip
    (store / "pickled" / "1" / "generator.pt2").write_bytes(b"\x80\x04N.")  # pickle of None
    return store
