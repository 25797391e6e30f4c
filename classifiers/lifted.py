"""LiftedNet: a plain sequential network rebuilt from an uploaded torch.export program.

`classifiers.lift.lift` reads the program's graph into a list of layer specs; this module
turns the specs into standard torch layers (nn.Conv2d, nn.BatchNorm2d, nn.Linear, ...),
so that `classifiers.sbn.convert` finds the BatchNorm layers and a zoo-format manifest
(`"architecture": "classifiers.lifted:LiftedNet"`, `"config": model.config`, safetensors
weights) rebuilds the network without the user's Python class.

Layer specs, one dict per layer, {"kind": ..., **arguments}:

    conv              in_channels, out_channels, kernel_size, stride, padding, dilation,
                      groups, bias                                     -> nn.Conv2d
    linear            in_features, out_features, bias                  -> nn.Linear
    batch_norm        num_features, rank (2 or 4), eps, momentum, affine
                                                          -> nn.BatchNorm1d / 2d
    affine            num_features, rank: x * scale + shift per channel (input scaling)
    relu, silu, tanh, sigmoid, leaky_relu (negative_slope), gelu (approximate),
    hardtanh (min_val, max_val)                                        -> activations
    max_pool          kernel_size, stride, padding, dilation, ceil_mode -> nn.MaxPool2d
    avg_pool          kernel_size, stride, padding, ceil_mode, count_include_pad,
                      divisor_override                                 -> nn.AvgPool2d
    adaptive_avg_pool output_size                                      -> nn.AdaptiveAvgPool2d
    flatten           (N, ...) -> (N, features)
    log_softmax       over the classes (dim 1)

Example:
    model = LiftedNet([1, 8, 8], [{"kind": "flatten"}, {"kind": "linear", "in_features": 64,
                                  "out_features": 10, "bias": True}])
    architectures.build("classifiers.lifted:LiftedNet", model.config, "weights.safetensors")
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from architectures import architecture


class ChannelAffine(nn.Module):
    """x * scale + shift with one scale and shift per channel (dim 1), e.g. input scaling."""

    def __init__(self, num_features: int, rank: int):
        super().__init__()
        self.rank = rank
        self.register_buffer("scale", torch.ones(num_features))
        self.register_buffer("shift", torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, *([1] * (x.dim() - 2)))
        return torch.addcmul(self.shift.view(shape), x, self.scale.view(shape))


class LogSoftmax(nn.LogSoftmax):
    def __init__(self):
        super().__init__(dim=1)


def _conv(spec: dict[str, Any]) -> nn.Module:
    return nn.Conv2d(
        spec["in_channels"],
        spec["out_channels"],
        tuple(spec["kernel_size"]),
        stride=tuple(spec["stride"]),
        padding=tuple(spec["padding"]),
        dilation=tuple(spec["dilation"]),
        groups=spec["groups"],
        bias=spec["bias"],
    )


def _batch_norm(spec: dict[str, Any]) -> nn.Module:
    cls = nn.BatchNorm2d if spec["rank"] == 4 else nn.BatchNorm1d
    return cls(spec["num_features"], eps=spec["eps"], momentum=spec["momentum"],
               affine=spec["affine"])  # fmt: skip


def _pool(cls: type[nn.Module], names: tuple[str, ...]) -> Callable[[dict], nn.Module]:
    def make(spec: dict[str, Any]) -> nn.Module:
        return cls(**{name: _tuple_or_value(spec[name]) for name in names})

    return make


def _tuple_or_value(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


_BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "conv": _conv,
    "linear": lambda s: nn.Linear(s["in_features"], s["out_features"], bias=s["bias"]),
    "batch_norm": _batch_norm,
    "affine": lambda s: ChannelAffine(s["num_features"], s["rank"]),
    "relu": lambda s: nn.ReLU(),
    "silu": lambda s: nn.SiLU(),
    "tanh": lambda s: nn.Tanh(),
    "sigmoid": lambda s: nn.Sigmoid(),
    "leaky_relu": lambda s: nn.LeakyReLU(s["negative_slope"]),
    "gelu": lambda s: nn.GELU(approximate=s["approximate"]),
    "hardtanh": lambda s: nn.Hardtanh(s["min_val"], s["max_val"]),
    "max_pool": _pool(nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "avg_pool": _pool(
        nn.AvgPool2d,
        ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    ),
    "adaptive_avg_pool": _pool(nn.AdaptiveAvgPool2d, ("output_size",)),
    "flatten": lambda s: nn.Flatten(1),
    "log_softmax": lambda s: LogSoftmax(),
}
LAYER_KINDS = tuple(_BUILDERS)


def make_layer(spec: dict[str, Any]) -> nn.Module:
    builder = _BUILDERS.get(spec.get("kind"))
    if builder is None:
        raise ValueError(f"layer kind must be one of {LAYER_KINDS}, got {spec.get('kind')!r}")
    return builder(spec)


@architecture
class LiftedNet(nn.Module):
    """A sequence of standard layers (see the module docstring); output logits.

    input_shape: shape of one input, [C, H, W] or [features]; layers: one spec per layer.
    """

    def __init__(self, input_shape: list[int], layers: list[dict[str, Any]]):
        super().__init__()
        if len(input_shape) not in (1, 3):
            raise ValueError(f"input_shape must be [C, H, W] or [features], got {input_shape}")
        self.input_shape = tuple(input_shape)  # classifiers.sbn.predict checks inputs
        self.layer_specs = [dict(spec) for spec in layers]
        self.layers = nn.ModuleList(make_layer(spec) for spec in layers)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor kwargs (JSON-able): what a zoo-format manifest stores as "config"."""
        return {"input_shape": list(self.input_shape), "layers": copy.deepcopy(self.layer_specs)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
