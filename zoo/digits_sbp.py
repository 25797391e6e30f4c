"""Digits classifiers for Structured Bayesian Pruning: a LeNet-5-like conv net and an MLP.

Both are classifiers.compress.BlockNet networks on 1x8x8 inputs in [0, 1] (the digits
split of zoo.data), so classifiers.sbp can add noise layers to them and
classifiers.compress can slice them. Four models ship in the store:

    digits-lenet5       DigitsLeNet5, units 20-50-800-500 (conv1, conv2 channels; dense
                        inputs), the thesis' LeNet-5 widths adapted to 8x8
    digits-lenet5-sbp   its SBP-compressed version, a plain classifiers.compress:BlockNet
    digits-mlp          DigitsMLP 64-500-300-10
    digits-mlp-sbp      its SBP-compressed version

Trained by `python -m zoo.train_sbp`.

Example:
    >>> model = load("digits-lenet5-sbp")
    >>> split = load_digits_split()
    >>> sbp.predict(model, split.x_test[:4]).label
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from architectures import architecture, build
from classifiers.compress import BlockNet

STORE = Path(__file__).resolve().parent / "store"
INPUT_SHAPE = [1, 8, 8]
CLASSES = list(range(10))


@architecture
class DigitsLeNet5(BlockNet):
    """conv3x3(conv1)-ReLU-pool2 (8x8 -> 4x4), conv3x3(conv2)-ReLU, dense(conv2*16 -> dense)-ReLU,
    dense(dense -> classes). With the defaults the units per layer are 20-50-800-500.
    """

    def __init__(self, conv1: int = 20, conv2: int = 50, dense: int = 500, classes: int = 10):
        blocks = [
            {"kind": "conv", "in_channels": 1, "out_channels": conv1, "pool": 2},
            {"kind": "conv", "in_channels": conv1, "out_channels": conv2},
            {"kind": "dense", "in_features": conv2 * 16, "out_features": dense},
            {"kind": "dense", "in_features": dense, "out_features": classes, "relu": False},
        ]
        super().__init__(INPUT_SHAPE, blocks)
        self._kwargs = {"conv1": conv1, "conv2": conv2, "dense": dense, "classes": classes}

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._kwargs)


@architecture
class DigitsMLP(BlockNet):
    """64-hidden[0]-hidden[1]-classes ReLU MLP on the flattened image (default 64-500-300-10)."""

    def __init__(self, hidden: list[int] | None = None, classes: int = 10):
        hidden = list(hidden or [500, 300])
        widths = [64, *hidden]
        blocks: list[dict[str, Any]] = [
            {"kind": "dense", "in_features": fan_in, "out_features": fan_out}
            for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True)
        ]
        blocks.append({"kind": "dense", "in_features": widths[-1], "out_features": classes})
        blocks[-1]["relu"] = False
        super().__init__(INPUT_SHAPE, blocks)
        self._kwargs = {"hidden": hidden, "classes": classes}

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._kwargs)


def load(name: str, version: str = "1", device: str = "cpu") -> BlockNet:
    """Build a stored digits SBP-zoo model (eval mode) from its manifest."""
    folder = STORE / name / version
    manifest = json.loads((folder / "manifest.json").read_text())
    return build(manifest["architecture"], manifest["config"], folder / manifest["weights"], device)
