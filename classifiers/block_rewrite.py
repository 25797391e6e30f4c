"""Rewrite a lifted network as a `classifiers.compress.BlockNet`, for SBP pruning.

SBP noise sits on conv output channels and dense input features, and `compress` slices
pruned units out of conv and dense blocks, so a network must fit the block form:

    conv blocks:   conv [BN | affine]* ReLU [max-pool]    (ReLU and max-pool in either order)
    then           [avg / adaptive-avg pooling] flatten   (folded into the first dense layer)
    dense blocks:  linear [BN | affine]* [ReLU]
    at the end:    [log_softmax]                          (dropped: probabilities unchanged)

Convolutions must have stride 1, dilation 1, one group, a square kernel and equal
padding on both axes; a max-pool must have kernel = stride, no padding, and tile the map
(or floor it). BatchNorm (eval statistics) and per-channel affines after a conv or
linear layer fold into its weights and bias; one before a layer (input scaling, a BN
after a ReLU) folds into that layer's input, which for a zero-padded convolution is
exact only for pure scaling. Linear pooling before the first dense layer folds into its
weights. Anything else raises `UnsupportedGraph` naming the graph node.

Example:
    blocks = to_block_net(lift(program, [1, 8, 8]))    # plain BlockNet, same outputs
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from classifiers.compress import BlockNet
from classifiers.lift import UnsupportedGraph
from classifiers.lifted import LiftedNet

MAX_POOLING_FEATURES = 1 << 16  # features whose pooling map is folded into a dense layer
TOLERANCE = 1e-4  # max |block net - lifted net|, relative to the outputs' size


@dataclass
class _Layer:
    spec: dict[str, Any]
    module: nn.Module
    source: str

    @property
    def kind(self) -> str:
        return self.spec["kind"]


@dataclass
class _Rewrite:
    """Blocks built so far, and an affine waiting to fold into the next layer's input."""

    layers: list[_Layer]
    input_shape: tuple[int, ...]
    position: int = 0
    specs: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    pending: tuple[torch.Tensor, torch.Tensor] | None = None  # per-channel (scale, shift)
    pooling: torch.Tensor | None = None  # (features before, features after) linear map
    dropped_log_softmax: bool = False

    def peek(self) -> _Layer | None:
        return self.layers[self.position] if self.position < len(self.layers) else None

    def take(self) -> _Layer:
        layer = self.layers[self.position]
        self.position += 1
        return layer


def _affine_of(layer: _Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel of an eval-mode BN or affine layer, float64."""
    module = layer.module
    if layer.kind == "affine":
        return module.scale.double(), module.shift.double()
    inv_std = torch.rsqrt(module.running_var.double() + module.eps)
    scale = inv_std * (module.weight.double() if module.affine else 1.0)
    shift = -module.running_mean.double() * scale
    if module.affine:
        shift = shift + module.bias.double()
    return scale, shift


def _fold_output_affines(rw: _Rewrite, weight: torch.Tensor, bias: torch.Tensor):
    """BN / affine layers right after a conv or linear layer, folded into it."""
    while (layer := rw.peek()) is not None and layer.kind in ("batch_norm", "affine"):
        rw.take()
        scale, shift = _affine_of(layer)
        weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
        bias = bias * scale + shift
    return weight, bias


def _fold_input_affine(rw: _Rewrite, layer: _Layer, weight: torch.Tensor, bias: torch.Tensor):
    """The pending affine of this layer's input channels, folded into its weights."""
    if rw.pending is None:
        return weight, bias
    scale, shift = rw.pending
    rw.pending = None
    if weight.dim() == 4:
        padded = any(layer.spec["padding"])
        if padded and bool(shift.abs().max() > 0):
            raise UnsupportedGraph(
                layer.source,
                "a shift of the input before a zero-padded convolution changes its border "
                "outputs and cannot be folded into a block network",
            )
        bias = bias + (weight.sum((2, 3)) * shift).sum(1)
        return weight * scale.view(1, -1, 1, 1), bias
    repeat = weight.shape[1] // scale.numel()  # per channel -> per flattened feature
    scale, shift = scale.repeat_interleave(repeat), shift.repeat_interleave(repeat)
    return weight * scale, bias + weight @ shift


def _absorb_affines(rw: _Rewrite) -> None:
    while (layer := rw.peek()) is not None and layer.kind in ("batch_norm", "affine"):
        rw.take()
        scale, shift = _affine_of(layer)
        if rw.pending is not None:
            before, after = rw.pending
            if before.numel() != scale.numel():  # per channel, then per flattened feature
                repeat = scale.numel() // before.numel()
                before, after = before.repeat_interleave(repeat), after.repeat_interleave(repeat)
            scale, shift = before * scale, after * scale + shift
        rw.pending = (scale, shift)


def _weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    weight = module.weight.detach().double()
    bias = module.bias.detach().double() if module.bias is not None else None
    return weight, bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)


def _check_conv(layer: _Layer) -> None:
    spec = layer.spec
    kernel, padding = spec["kernel_size"], spec["padding"]
    problems = [
        "stride 1" if any(s != 1 for s in spec["stride"]) else None,
        "dilation 1" if any(d != 1 for d in spec["dilation"]) else None,
        "one group" if spec["groups"] != 1 else None,
        "a square kernel" if kernel[0] != kernel[1] else None,
        "equal padding on both axes" if padding[0] != padding[1] else None,
    ]
    problems = [p for p in problems if p]
    if problems:
        raise UnsupportedGraph(
            layer.source, f"a block network's convolutions need {', '.join(problems)}"
        )


def _max_pool_size(layer: _Layer, height: int, width: int) -> int:
    spec = layer.spec
    size = spec["kernel_size"][0]
    fits = (
        spec["kernel_size"] == [size, size]
        and spec["stride"] == [size, size]
        and spec["padding"] == [0, 0]
        and spec["dilation"] == [1, 1]
        and (not spec["ceil_mode"] or (height % size == 0 and width % size == 0))
    )
    if not fits:
        raise UnsupportedGraph(
            layer.source,
            "a block network's max-pool needs kernel = stride, no padding and no dilation",
        )
    return size


def _conv_block(rw: _Rewrite, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    layer = rw.take()
    _check_conv(layer)
    weight, bias = _weights(layer.module)
    weight, bias = _fold_input_affine(rw, layer, weight, bias)
    weight, bias = _fold_output_affines(rw, weight, bias)
    kernel, padding = layer.spec["kernel_size"][0], layer.spec["padding"][0]
    height, width = shape[1] + 2 * padding - kernel + 1, shape[2] + 2 * padding - kernel + 1
    relu, pool = False, 1
    while (follower := rw.peek()) is not None and follower.kind in ("relu", "max_pool"):
        if (follower.kind == "relu" and relu) or (follower.kind == "max_pool" and pool > 1):
            break
        rw.take()
        if follower.kind == "relu":
            relu = True
        else:
            pool = _max_pool_size(follower, height, width)
    if not relu:
        raise UnsupportedGraph(
            layer.source, "a block network's convolution must be followed by a ReLU"
        )
    index = len(rw.specs)
    rw.specs.append({"kind": "conv", "in_channels": shape[0], "out_channels": weight.shape[0],
                     "kernel_size": kernel, "padding": padding, "pool": pool})  # fmt: skip
    rw.state[f"blocks.{index}.conv.weight"] = weight
    rw.state[f"blocks.{index}.bias"] = bias
    _absorb_affines(rw)  # a BN after the ReLU folds into the next layer's input
    return weight.shape[0], height // pool, width // pool


def _pooling_map(layers: list[_Layer], shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix of a chain of linear pooling layers on flattened (C, H, W) features."""
    features = math.prod(shape)
    if features > MAX_POOLING_FEATURES:
        raise UnsupportedGraph(layers[0].source, "pooling over too many features to fold")
    basis = torch.eye(features, dtype=torch.float64).view(features, *shape)
    with torch.no_grad():
        for layer in layers:
            basis = layer.module(basis)
    return basis.reshape(features, -1).t()  # (features after, features before)


def _flatten(rw: _Rewrite, shape: tuple[int, ...]) -> None:
    """Pooling then flatten between the conv blocks and the first dense block."""
    pools = []
    while (layer := rw.peek()) is not None and layer.kind in ("avg_pool", "adaptive_avg_pool"):
        pools.append(rw.take())
    if pools:
        if rw.pending is not None:
            raise UnsupportedGraph(pools[0].source, "an affine before pooling is not supported")
        rw.pooling = _pooling_map(pools, shape)
    layer = rw.peek()
    if layer is None or layer.kind != "flatten":
        source = layer.source if layer is not None else "output"
        kind = layer.kind if layer is not None else "the end"
        raise UnsupportedGraph(
            source,
            f"{kind} does not fit a block network: conv-ReLU[-max-pool] blocks, then flatten, "
            "then linear layers",
        )
    rw.take()
    _absorb_affines(rw)


def _dense_block(rw: _Rewrite) -> None:
    layer = rw.take()
    weight, bias = _weights(layer.module)
    weight, bias = _fold_input_affine(rw, layer, weight, bias)  # on the pooled features
    if rw.pooling is not None:  # averaging before the flatten: read the unpooled features
        weight, rw.pooling = weight @ rw.pooling, None
    weight, bias = _fold_output_affines(rw, weight, bias)
    relu = (follower := rw.peek()) is not None and follower.kind == "relu"
    if relu:
        rw.take()
    index = len(rw.specs)
    rw.specs.append({"kind": "dense", "in_features": weight.shape[1],
                     "out_features": weight.shape[0], "relu": relu})  # fmt: skip
    rw.state[f"blocks.{index}.linear.weight"] = weight
    rw.state[f"blocks.{index}.linear.bias"] = bias
    _absorb_affines(rw)


def _rewrite(net: LiftedNet) -> _Rewrite:
    sources = getattr(net, "sources", None) or [f"layers.{i}" for i in range(len(net.layers))]
    layers = [_Layer(s, m, n) for s, m, n in zip(net.layer_specs, net.layers, sources, strict=True)]
    rw = _Rewrite(layers, tuple(net.input_shape))
    _absorb_affines(rw)  # input scaling
    shape = rw.input_shape
    while (layer := rw.peek()) is not None and layer.kind == "conv":
        shape = _conv_block(rw, shape)
    if len(shape) == 3:
        _flatten(rw, shape)
    while (layer := rw.peek()) is not None and layer.kind == "linear":
        _dense_block(rw)
    if (layer := rw.peek()) is not None and layer.kind == "log_softmax":
        rw.take()
        rw.dropped_log_softmax = True
    if (layer := rw.peek()) is not None or not rw.specs or rw.specs[-1]["kind"] != "dense":
        source, kind = (layer.source, layer.kind) if layer is not None else ("output", "the end")
        raise UnsupportedGraph(
            source,
            f"{kind} does not fit a block network: conv-ReLU[-max-pool] blocks, then flatten, "
            "then linear layers (the last one without ReLU)",
        )
    if rw.pending is not None:
        raise UnsupportedGraph(layers[-1].source, "an affine after the last layer")
    return rw


@torch.no_grad()
def to_block_net(net: LiftedNet) -> BlockNet:
    """A plain BlockNet (eval mode) computing what `net` computes; UnsupportedGraph if its
    structure does not fit the block form (see the module docstring).

    A final log_softmax is dropped (the softmax of the outputs is unchanged); the
    result's `dropped_log_softmax` attribute says so.
    """
    rw = _rewrite(net)
    blocks = BlockNet(list(net.input_shape), rw.specs)
    state = {k: v.float() for k, v in rw.state.items()}
    missing, unexpected = blocks.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"block rewrite bug: missing {missing}, unexpected {unexpected}")
    blocks.eval()
    blocks.dropped_log_softmax = rw.dropped_log_softmax
    _check_same_outputs(net, blocks)
    return blocks


def _check_same_outputs(net: LiftedNet, blocks: BlockNet) -> None:
    x = torch.rand(5, *net.input_shape, generator=torch.Generator().manual_seed(0))
    expected, got = net.eval()(x), blocks(x)
    if blocks.dropped_log_softmax:  # compare probabilities
        expected, got = expected.softmax(-1), got.softmax(-1)
    diff = float((expected - got).abs().max())
    if not diff <= TOLERANCE * max(1.0, float(expected.abs().max())):
        raise UnsupportedGraph("graph", f"the block network differs by {diff:.3g} (a bug)")
