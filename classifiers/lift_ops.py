"""How each ATen operation of an uploaded program becomes a layer (for classifiers.lift).

One handler per family of operations reads a node's arguments (by schema name, see
`GraphWalk.bind`) and appends a layer spec with its tensors to the walk, folds a constant
affine into the previous layer, or raises `UnsupportedGraph` naming the node. `handlers()`
maps every supported aten overload of this torch build to its handler.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import fx


class GraphWalk(Protocol):
    """What a handler uses of the walk over the graph (classifiers.lift.GraphWalk)."""

    activation: fx.Node
    in_tuple: bool
    modules: list[torch.nn.Module]
    probe: torch.Tensor
    specs: list[dict[str, Any]]

    @property
    def rank(self) -> int: ...

    @property
    def channels(self) -> int: ...

    def bind(self, node: fx.Node) -> dict[str, Any]: ...

    def tensor(self, node: fx.Node, value: Any, what: str) -> torch.Tensor: ...

    def add_layer(self, node: fx.Node, spec: dict[str, Any], **tensors: torch.Tensor) -> None: ...

    def replace_last(self, spec: dict[str, Any], **tensors: torch.Tensor) -> None: ...

    def expect_activation(self, node: fx.Node, value: Any, what: str = "input") -> None: ...


aten = torch.ops.aten


class UnsupportedGraph(ValueError):
    """The program cannot be rebuilt: `node` names the graph node (or "inputs",
    "output", "graph"), `reason` says why."""

    def __init__(self, node: str, reason: str):
        super().__init__(f"{node}: {reason}")
        self.node, self.reason = node, reason


class _Batch:
    """Stands for the batch size (sym_size(x, 0)) in a reshape's size list."""


class _Symbolic:
    """Stands for any other symbolic value."""


class _Activation:
    """Stands for the activation flowing through the chain."""


BATCH, SYMBOLIC, ACTIVATION = _Batch(), _Symbolic(), _Activation()


def _overloads(*names: str) -> set[Any]:
    """The aten overloads of this torch build among `names` ("op.overload")."""
    found = set()
    for name in names:
        op_name, _, overload = name.partition(".")
        packet = getattr(aten, op_name, None)
        if packet is not None and hasattr(packet, overload or "default"):
            found.add(getattr(packet, overload or "default"))
    return found


SIZE_OPS = _overloads("sym_size.int", "sym_size.default", "sym_numel", "sym_stride.int")
_TUPLE_BATCH_NORMS = _overloads(
    "_native_batch_norm_legit_no_training",
    "native_batch_norm",
    "_native_batch_norm_legit",
)
_BATCH_NORMS = _overloads("batch_norm") | _TUPLE_BATCH_NORMS
_ACTIVATIONS: dict[Any, tuple[str, tuple[str, ...]]] = {}
for _kind, _names, _params in (
    ("relu", ("relu", "relu_"), ()),
    ("silu", ("silu", "silu_"), ()),
    ("tanh", ("tanh", "tanh_"), ()),
    ("sigmoid", ("sigmoid", "sigmoid_"), ()),
    ("leaky_relu", ("leaky_relu", "leaky_relu_"), ("negative_slope",)),
    ("gelu", ("gelu", "gelu_"), ("approximate",)),
    ("hardtanh", ("hardtanh", "hardtanh_"), ("min_val", "max_val")),
):
    for _op in _overloads(*_names):
        _ACTIVATIONS[_op] = (_kind, _params)
SIGMOIDS = _overloads("sigmoid")
MULTIPLIES = _overloads("mul.Tensor")
_DROPOUTS = _overloads(
    "dropout", "dropout_", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"
)
_IDENTITIES = _overloads("clone", "alias", "detach", "lift_fresh_copy", "contiguous")
_RESHAPES = _overloads(
    "view", "reshape", "_unsafe_view", "flatten.using_ints", "squeeze.dim", "squeeze.dims",
    "squeeze",
)  # fmt: skip
_ARITHMETIC = {
    op: name
    for name in ("add", "sub", "mul", "div", "rsub")
    for op in _overloads(f"{name}.Tensor", f"{name}.Scalar", f"{name}_.Tensor", f"{name}_.Scalar")
}


def _pair(value: Any) -> list[int]:
    values = [int(v) for v in (value if isinstance(value, Sequence) else [value])]
    return values * 2 if len(values) == 1 else values


# Handlers: one per family of operations --------------------------------------------------


def _conv(walk: GraphWalk, node: fx.Node) -> None:
    a = walk.bind(node)
    walk.expect_activation(node, a["input"])
    weight = walk.tensor(node, a["weight"], "the weight")
    if weight.dim() != 4 or walk.rank != 4:
        raise UnsupportedGraph(node.name, "only 2-D convolutions of (N, C, H, W) are supported")
    if a.get("transposed"):
        raise UnsupportedGraph(node.name, "transposed convolutions are not supported")
    kernel, dilation, groups = list(weight.shape[2:]), _pair(a["dilation"]), int(a["groups"])
    padding = a["padding"]
    if isinstance(padding, str):
        if padding == "same" and any(
            d * (k - 1) % 2 for k, d in zip(kernel, dilation, strict=True)
        ):
            raise UnsupportedGraph(node.name, "padding 'same' with an even kernel is asymmetric")
        same = padding == "same"
        padding = [d * (k - 1) // 2 if same else 0 for k, d in zip(kernel, dilation, strict=True)]
    bias = a["bias"]
    spec = {
        "kind": "conv",
        "in_channels": weight.shape[1] * groups,
        "out_channels": weight.shape[0],
        "kernel_size": kernel,
        "stride": _pair(a["stride"]),
        "padding": _pair(padding),
        "dilation": dilation,
        "groups": groups,
        "bias": bias is not None,
    }
    walk.add_layer(node, spec, weight=weight, bias=bias)


def _dense(walk: GraphWalk, node: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dim() != 2 or walk.rank != 2:
        raise UnsupportedGraph(
            node.name, "only linear layers on (N, features) activations are supported"
        )
    spec = {"kind": "linear", "in_features": weight.shape[1], "out_features": weight.shape[0],
            "bias": bias is not None}  # fmt: skip
    if bias is not None and bias.numel() not in (1, weight.shape[0]):
        raise UnsupportedGraph(node.name, f"a bias of shape {list(bias.shape)} is not per output")
    if bias is not None:
        bias = bias.reshape(-1).expand(weight.shape[0])
    walk.add_layer(node, spec, weight=weight, bias=bias)


def _linear(walk: GraphWalk, node: fx.Node) -> None:
    a = walk.bind(node)
    walk.expect_activation(node, a["input"])
    _dense(walk, node, walk.tensor(node, a["weight"], "the weight"), a["bias"])


def _addmm(walk: GraphWalk, node: fx.Node) -> None:
    a = walk.bind(node)
    walk.expect_activation(node, a["mat1"], "first matrix")
    matrix = walk.tensor(node, a["mat2"], "the second matrix")
    bias = walk.tensor(node, a["self"], "the bias")
    _dense(walk, node, a["alpha"] * matrix.t(), a["beta"] * bias)


def _matmul(walk: GraphWalk, node: fx.Node) -> None:
    a = walk.bind(node)
    names = list(a)
    walk.expect_activation(node, a[names[0]], "first matrix")
    _dense(walk, node, walk.tensor(node, a[names[1]], "the second matrix").t(), None)


def _per_channel(walk: GraphWalk, node: fx.Node, value: Any) -> torch.Tensor:
    """A constant as one float64 value per channel (dim 1), if it broadcasts that way."""
    t = torch.as_tensor(value, dtype=torch.float64)
    channels = walk.channels
    if t.numel() == 1:
        return t.reshape(1).expand(channels).clone()
    trailing = [channels] + [1] * (walk.rank - 2)
    shape = list(t.shape)
    fits = len(shape) >= len(trailing) and shape[len(shape) - len(trailing) :] == trailing
    if not fits or len(shape) > walk.rank or math.prod(shape) != channels:
        raise UnsupportedGraph(
            node.name, f"a constant of shape {shape} is neither a scalar nor one value per channel"
        )
    return t.reshape(channels)


def _arithmetic(walk: GraphWalk, node: fx.Node) -> None:
    name = _ARITHMETIC[node.target]
    a = walk.bind(node)
    x, other, alpha = a["self"], a["other"], float(a.get("alpha", 1))
    if (x is ACTIVATION) == (other is ACTIVATION):
        raise UnsupportedGraph(node.name, f"{name} must combine the activation with a constant")
    first = x is ACTIVATION
    c = _per_channel(walk, node, other if first else x)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    if name == "div" and not first:
        raise UnsupportedGraph(node.name, "dividing by the activation is not supported")
    scale, shift = {
        "add": (one, alpha * c) if first else (alpha * one, c),
        "sub": (one, -alpha * c) if first else (-alpha * one, c),
        "rsub": (-alpha * one, c) if first else (one, -alpha * c),
        "mul": (c, zero),
        "div": (1 / c, zero),
    }[name]
    _affine(walk, node, scale, shift)


def _affine(walk: GraphWalk, node: fx.Node, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """x * scale + shift per channel: folded into a preceding conv, linear or affine."""
    last = walk.specs[-1]["kind"] if walk.specs else None
    if last in ("conv", "linear"):
        module = walk.modules[-1]
        view = (-1,) + (1,) * (module.weight.dim() - 1)
        weight = module.weight.double() * scale.view(view)
        bias = module.bias.double() if module.bias is not None else torch.zeros_like(scale)
        walk.replace_last(
            {**walk.specs[-1], "bias": True}, weight=weight, bias=bias * scale + shift
        )
    elif last == "affine":
        module = walk.modules[-1]
        walk.replace_last(walk.specs[-1], scale=module.scale * scale,
                          shift=module.shift * scale + shift)  # fmt: skip
    else:
        spec = {"kind": "affine", "num_features": walk.channels, "rank": walk.rank}
        probe = walk.probe
        walk.add_layer(node, spec, scale=scale, shift=shift)
        walk.probe = probe  # recomputed below, like the folded cases
    view = (1, -1) + (1,) * (walk.rank - 2)
    walk.probe = (walk.probe.double() * scale.view(view) + shift.view(view)).float()
    walk.activation, walk.in_tuple = node, False


def _batch_norm(walk: GraphWalk, node: fx.Node) -> None:
    a = walk.bind(node)
    walk.expect_activation(node, a["input"])
    if a.get("training"):
        raise UnsupportedGraph(
            node.name, "batch norm uses batch statistics (exported in training mode): export "
            "model.eval()",
        )  # fmt: skip
    mean, var = a["running_mean"], a["running_var"]
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        raise UnsupportedGraph(node.name, "batch norm without running statistics")
    if walk.rank not in (2, 4):
        raise UnsupportedGraph(node.name, f"batch norm of a {walk.rank}-D activation")
    weight, bias = a["weight"], a["bias"]
    affine = weight is not None or bias is not None
    spec = {
        "kind": "batch_norm",
        "num_features": walk.channels,
        "rank": walk.rank,
        "eps": float(a["eps"]),
        "momentum": float(a["momentum"] or 0.1),
        "affine": affine,
    }
    tensors = {"running_mean": mean, "running_var": var}
    if affine:
        tensors["weight"] = weight if weight is not None else torch.ones_like(mean)
        tensors["bias"] = bias if bias is not None else torch.zeros_like(mean)
    walk.add_layer(node, spec, **tensors)
    walk.in_tuple = node.target in _TUPLE_BATCH_NORMS


def _activation(walk: GraphWalk, node: fx.Node) -> None:
    kind, params = _ACTIVATIONS[node.target]
    a = walk.bind(node)
    walk.expect_activation(node, a["self"])
    walk.add_layer(node, {"kind": kind, **{name: a[name] for name in params}})


def _pool(walk: GraphWalk, node: fx.Node) -> None:
    a = walk.bind(node)
    walk.expect_activation(node, a["self"])
    if walk.rank != 4:
        raise UnsupportedGraph(node.name, "pooling needs (N, C, H, W) activations")
    name = node.target.name()
    if "adaptive" in name:
        walk.add_layer(node, {"kind": "adaptive_avg_pool", "output_size": _pair(a["output_size"])})
        return
    kernel = _pair(a["kernel_size"])
    spec = {"kind": "max_pool" if "max" in name else "avg_pool", "kernel_size": kernel,
            "stride": _pair(a["stride"]) if a["stride"] else kernel,
            "padding": _pair(a["padding"]), "ceil_mode": bool(a["ceil_mode"])}  # fmt: skip
    if "max" in name:
        spec["dilation"] = _pair(a["dilation"])
    else:
        spec.update(count_include_pad=bool(a["count_include_pad"]),
                    divisor_override=a["divisor_override"])  # fmt: skip
    walk.add_layer(node, spec)
    walk.in_tuple = "with_indices" in name


def _mean(walk: GraphWalk, node: fx.Node) -> None:
    a = walk.bind(node)
    walk.expect_activation(node, a["self"])
    dims = {int(d) % walk.rank for d in a["dim"]} if walk.rank == 4 else set()
    if dims != {2, 3} or a.get("dtype") is not None:
        raise UnsupportedGraph(node.name, "only a mean over (H, W) of (N, C, H, W) is supported")
    walk.add_layer(node, {"kind": "adaptive_avg_pool", "output_size": [1, 1]})
    if not a["keepdim"]:
        walk.add_layer(node, {"kind": "flatten"})


def _reshape(walk: GraphWalk, node: fx.Node) -> None:
    a = walk.bind(node)
    values = list(a.values())
    walk.expect_activation(node, values[0])
    batch = walk.probe.shape[0]

    def concrete(value: Any) -> Any:
        if isinstance(value, list):
            return [concrete(v) for v in value]
        if value is SYMBOLIC:
            raise UnsupportedGraph(node.name, "reshapes with a computed size")
        return batch if value is BATCH else value

    result = node.target(walk.probe, *[concrete(v) for v in values[1:]])
    if result.shape == walk.probe.shape:
        walk.activation, walk.in_tuple = node, False
    elif result.dim() == 2 and result.shape[0] == batch and walk.rank > 2:
        walk.add_layer(node, {"kind": "flatten"})
    else:
        raise UnsupportedGraph(
            node.name,
            f"reshapes {list(walk.probe.shape[1:])} per input to {list(result.shape)} for "
            f"{batch} inputs: only flattening each input to a vector is supported",
        )


def _identity(walk: GraphWalk, node: fx.Node) -> None:
    a = walk.bind(node)
    walk.expect_activation(node, next(iter(a.values())))
    if node.target in _DROPOUTS or "dropout" in node.target.name():
        if a.get("train"):
            raise UnsupportedGraph(node.name, "dropout is active (exported in training mode)")
    walk.activation = node
    walk.in_tuple = node.target is aten.native_dropout.default


def _first_output(walk: GraphWalk, node: fx.Node) -> None:
    if not walk.in_tuple:
        raise UnsupportedGraph(node.name, "indexes into the activation")
    if node.args[1] != 0:
        raise UnsupportedGraph(
            node.name,
            f"uses output {node.args[1]} of {walk.activation.name} (pooling indices, batch "
            "statistics): only the first output is supported",
        )
    walk.activation, walk.in_tuple = node, False


def _log_softmax(walk: GraphWalk, node: fx.Node) -> None:
    a = walk.bind(node)
    walk.expect_activation(node, a["self"])
    if walk.rank != 2 or int(a["dim"]) % 2 != 1 or a.get("dtype") is not None:
        raise UnsupportedGraph(node.name, "only a log_softmax over the classes is supported")
    walk.add_layer(node, {"kind": "log_softmax"})


def _softmax(walk: GraphWalk, node: fx.Node) -> None:
    raise UnsupportedGraph(
        node.name,
        "the program ends in softmax, but the service reads outputs as logits: export the "
        "network without its final softmax (or with log_softmax)",
    )


def handlers() -> dict[Any, Any]:
    table: dict[Any, Any] = {operator.getitem: _first_output}
    families = (
        (_conv, ("conv2d", "conv2d.padding", "convolution")),
        (_linear, ("linear",)),
        (_addmm, ("addmm",)),
        (_matmul, ("mm", "matmul")),
        (_pool, ("max_pool2d", "max_pool2d_with_indices", "avg_pool2d")),
        (_pool, ("adaptive_avg_pool2d", "_adaptive_avg_pool2d")),
        (_mean, ("mean.dim",)),
        (_identity, ("native_dropout",)),
        (_log_softmax, ("log_softmax.int", "_log_softmax")),
        (_softmax, ("softmax.int", "_softmax")),
    )
    for handler, names in families:
        table.update(dict.fromkeys(_overloads(*names), handler))
    table.update(dict.fromkeys(_BATCH_NORMS, _batch_norm))
    table.update(dict.fromkeys(_ACTIVATIONS, _activation))
    table.update(dict.fromkeys(_DROPOUTS | _IDENTITIES, _identity))
    table.update(dict.fromkeys(_RESHAPES, _reshape))
    table.update(dict.fromkeys(_ARITHMETIC, _arithmetic))
    return table
