"""Lift an uploaded torch.export classifier into a plain network our tools can work on.

`lift(program, input_shape)` walks the program's ATen graph, with no access to the
user's Python class, and rebuilds it as a `classifiers.lifted.LiftedNet` of standard
layers, then checks that the rebuilt network reproduces the program's outputs on random
inputs. `classifiers.block_rewrite.to_block_net` turns a lifted network into a
`classifiers.compress.BlockNet` when its structure fits (for SBP pruning).

Supported: one input (N, C, H, W) or (N, features), one output (N, classes) of logits
(or log-probabilities), and a single chain of these operations, in the forms torch 2.13's
export emits them (training IR) and after `run_decompositions()` (core ATen):
- convolution: conv2d (any stride, padding incl. "same"/"valid", dilation, groups),
  convolution (not transposed);
- dense: linear; addmm; mm or matmul with a constant matrix (a following add of a
  constant becomes the bias);
- batch norm in eval mode: batch_norm, _native_batch_norm_legit_no_training,
  native_batch_norm / _native_batch_norm_legit with training=False (BN2d and BN1d);
- per-channel or scalar add / sub / mul / div by constants (input normalisation): folded
  into the preceding conv or linear layer, else kept as an `affine` layer;
- activations relu, leaky_relu, gelu, silu (also decomposed: x * sigmoid(x)), tanh,
  sigmoid, hardtanh (and in-place forms);
- pooling max_pool2d (also with_indices), avg_pool2d, adaptive_avg_pool2d, mean over
  (H, W);
- flatten, view, reshape, squeeze that turn each input into a vector; identity-shaped
  views;
- dropout / native_dropout / feature_dropout with train=False, clone, alias, detach
  (identities); a final log_softmax.
Expressions over parameters alone (t, permute, ...) are evaluated once.

Refused with `UnsupportedGraph(node, reason)` before any work starts: several inputs or
outputs, inputs that are not 2-D or 4-D, a value used by two operations (branches,
residual additions, concatenations), an operation outside the list above, programs
exported in training mode (batch statistics, buffer updates, active dropout), a final
softmax (the service reads outputs as logits), and any program the rebuilt network does
not reproduce.

Example:
    program = torch.export.load("classifier.pt2")
    net = lift(program, [1, 8, 8])            # LiftedNet, eval mode
    net.config                                # zoo manifest "config"
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from classifiers.lifted import LiftedNet, make_layer

aten = torch.ops.aten
VERIFY_BATCH = 5  # rows of the random inputs the rebuilt network is checked on
VERIFY_TOLERANCE = 1e-4  # max |rebuilt - program|, relative to the outputs' size


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


_SIZE_OPS = _overloads("sym_size.int", "sym_size.default", "sym_numel", "sym_stride.int")
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
_SIGMOIDS = _overloads("sigmoid")
_MULTIPLIES = _overloads("mul.Tensor")
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


class _Walk:
    """State of one pass over the graph: known constants, the activation, the layers."""

    def __init__(self, program: ExportedProgram, input_shape: tuple[int, ...]):
        self.program = program
        self.graph = program.graph_module.graph
        self.values: dict[fx.Node, Any] = {}  # constants: parameters, buffers, folded
        self.symbolic: dict[fx.Node, Any] = {}  # node -> BATCH or SYMBOLIC
        self.specs: list[dict[str, Any]] = []
        self.modules: list[nn.Module] = []
        self.sources: list[str] = []  # the graph node each layer came from
        self.in_tuple = False  # the activation is a tuple (BN, pool with indices)
        self.done: set[fx.Node] = set()  # nodes a pattern has already taken in
        self.input_node = self._read_signature()
        self.activation = self.input_node
        self.input_shape = tuple(input_shape)
        self.probe = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0))

    # Signature -------------------------------------------------------------------------

    def _read_signature(self) -> fx.Node:
        signature, program = self.program.graph_signature, self.program
        by_name = {node.name: node for node in self.graph.nodes if node.op == "placeholder"}
        inputs = []
        for spec in signature.input_specs:
            node = by_name[spec.arg.name]
            if spec.kind == InputKind.USER_INPUT:
                inputs.append(node)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                source = (
                    program.state_dict if spec.target in program.state_dict else program.constants
                )
                self.values[node] = source[spec.target].detach()
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                self.values[node] = program.constants[spec.target].detach()
            else:
                raise UnsupportedGraph(
                    node.name, f"inputs of kind {spec.kind.name} are not supported"
                )
        if len(inputs) != 1:
            raise UnsupportedGraph(
                "inputs", f"the program takes {len(inputs)} inputs; a classifier takes one tensor"
            )
        outputs = [s for s in signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
        if len(outputs) != 1:
            raise UnsupportedGraph(
                "output",
                f"the program returns {len(outputs)} outputs; a classifier returns one "
                "(N, classes) tensor",
            )
        for spec in signature.output_specs:
            if spec.kind == OutputKind.BUFFER_MUTATION:
                raise UnsupportedGraph(
                    spec.arg.name,
                    f"the program updates buffer {spec.target} (exported in training mode?): "
                    "export model.eval()",
                )
            if spec.kind != OutputKind.USER_OUTPUT:
                raise UnsupportedGraph(
                    spec.arg.name, f"outputs of kind {spec.kind.name} are not supported"
                )
        return inputs[0]

    # Values ----------------------------------------------------------------------------

    def resolve(self, value: Any, node: fx.Node) -> Any:
        if isinstance(value, list | tuple):
            return [self.resolve(v, node) for v in value]
        if not isinstance(value, fx.Node):
            return value
        if value is self.activation:
            if self.in_tuple and node.target is not operator.getitem:
                raise UnsupportedGraph(node.name, f"uses the whole tuple {value.name}")
            return ACTIVATION
        if value in self.values:
            return self.values[value]
        if value in self.symbolic:
            return self.symbolic[value]
        raise UnsupportedGraph(
            node.name,
            f"uses {value.name}, an earlier activation: branches, residual additions and "
            "concatenations cannot be rebuilt as a chain of layers",
        )

    def bind(self, node: fx.Node) -> dict[str, Any]:
        """The node's arguments by schema name, defaults filled in, values resolved."""
        schema = node.target._schema
        bound = {}
        positional = [arg for arg in schema.arguments if not arg.kwarg_only]
        for i, arg in enumerate(schema.arguments):
            if not arg.kwarg_only and i < len(node.args) and positional[i] is arg:
                value = node.args[i]
            elif arg.name in node.kwargs:
                value = node.kwargs[arg.name]
            elif arg.has_default_value():
                value = arg.default_value
            else:
                raise UnsupportedGraph(node.name, f"argument {arg.name} is missing")
            bound[arg.name] = self.resolve(value, node)
        return bound

    def tensor(self, node: fx.Node, value: Any, what: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise UnsupportedGraph(node.name, f"{what} must be a constant tensor")
        return value

    def depends_on_input(self, node: fx.Node) -> bool:
        return any(
            arg not in self.values and arg not in self.symbolic for arg in node.all_input_nodes
        )

    # Layers ----------------------------------------------------------------------------

    def add_layer(self, node: fx.Node, spec: dict[str, Any], **tensors: torch.Tensor) -> None:
        module = make_layer(spec).eval()
        with torch.no_grad():
            try:
                for name, value in tensors.items():
                    if value is not None:
                        getattr(module, name).copy_(value.reshape(getattr(module, name).shape))
                probe = module(self.probe)
            except RuntimeError as error:
                raise UnsupportedGraph(node.name, f"does not fit its input: {error}") from None
        self.probe = probe
        self.specs.append(spec)
        self.modules.append(module)
        self.sources.append(node.name)
        self.activation, self.in_tuple = node, False

    @property
    def rank(self) -> int:
        return self.probe.dim()

    @property
    def channels(self) -> int:
        return self.probe.shape[1]

    def build(self) -> LiftedNet:
        net = LiftedNet(list(self.input_shape), self.specs)
        for target, source in zip(net.layers, self.modules, strict=True):
            target.load_state_dict(source.state_dict())
        net.sources = list(self.sources)
        return net.eval()

    def replace_last(self, spec: dict[str, Any], **tensors: torch.Tensor) -> None:
        """Rebuild the last layer with a new spec and tensors (the probe is kept)."""
        module = make_layer(spec).eval()
        with torch.no_grad():
            for name, value in tensors.items():
                getattr(module, name).copy_(value.reshape(getattr(module, name).shape))
        self.specs[-1], self.modules[-1] = spec, module

    # The walk --------------------------------------------------------------------------

    def run(self) -> LiftedNet:
        self._check_input()
        handlers = _handlers()
        for node in self.graph.nodes:
            if node.op == "placeholder" or node in self.done:
                continue
            if node.op == "output":
                self.finish(node)
            elif node.op == "get_attr":
                value = getattr(self.program.graph_module, node.target)
                if not isinstance(value, torch.Tensor):
                    raise UnsupportedGraph(node.name, "submodules (control flow) are not supported")
                self.values[node] = value.detach()
            elif node.op != "call_function":
                raise UnsupportedGraph(node.name, f"{node.op} nodes are not supported")
            elif node.target in _SIZE_OPS:
                batch = node.target is aten.sym_size.int and node.args[1] == 0
                self.symbolic[node] = BATCH if batch else SYMBOLIC
            elif not self.depends_on_input(node):
                if any(arg in self.symbolic for arg in node.all_input_nodes):
                    self.symbolic[node] = SYMBOLIC
                elif node.users:
                    self.fold_constant(node)
            elif not self.silu_pattern(node):
                self.check_single_consumer(node)
                handler = handlers.get(node.target)
                if handler is None:
                    raise UnsupportedGraph(
                        node.name,
                        f"operation {node.target} is not supported (see classifiers.lift)",
                    )
                handler(self, node)
        return self.build()

    def _check_input(self) -> None:
        name, shape = self.input_node.name, self.input_shape
        if len(shape) not in (1, 3):
            raise UnsupportedGraph(
                name,
                f"inputs of shape {list(shape)}: only (N, C, H, W) images and (N, features) "
                "vectors are supported",
            )
        value = self.input_node.meta.get("val")
        if isinstance(value, torch.Tensor):
            tail = [int(d) if isinstance(d, int) else None for d in value.shape[1:]]
            if tail != list(shape):
                raise UnsupportedGraph(
                    name,
                    f"the program takes inputs of shape {list(value.shape)}; the manifest's "
                    f"input_shape {list(shape)} does not match",
                )
            if not value.dtype.is_floating_point:
                raise UnsupportedGraph(name, f"the program takes {value.dtype} inputs, not floats")

    def fold_constant(self, node: fx.Node) -> None:
        """Evaluate an expression over parameters alone (a weight's transpose, say)."""
        args = [self.resolve(arg, node) for arg in node.args]
        kwargs = {key: self.resolve(value, node) for key, value in node.kwargs.items()}
        target = node.target
        is_aten = isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"
        if not is_aten and target is not operator.getitem:
            raise UnsupportedGraph(node.name, f"operation {target} is not supported")
        with torch.no_grad():
            self.values[node] = target(*args, **kwargs)

    def silu_pattern(self, node: fx.Node) -> bool:
        """x * sigmoid(x), the decomposed SiLU, becomes one silu layer."""
        x = self.activation
        if node.target not in _SIGMOIDS or node.args[0] is not x or self.in_tuple:
            return False
        users = [user for user in x.users if user.target not in _SIZE_OPS]
        product = next((user for user in users if user is not node), None)
        if len(users) != 2 or product is None or product.target not in _MULTIPLIES:
            return False
        if set(product.args) != {x, node} or list(node.users) != [product]:
            return False
        self.add_layer(node, {"kind": "silu"})
        self.activation = product
        self.done.add(product)
        return True

    def check_single_consumer(self, node: fx.Node) -> None:
        if self.activation not in node.all_input_nodes:
            self.resolve(next(n for n in node.all_input_nodes if n not in self.values), node)
        consumers = [
            user
            for user in self.activation.users
            if user.target not in _SIZE_OPS
            and not (user.target is operator.getitem and not user.users and user is not node)
        ]
        if consumers != [node]:
            names = ", ".join(user.name for user in consumers)
            raise UnsupportedGraph(
                node.name,
                f"the output of {self.activation.name} is used by several operations ({names}): "
                "branches, residual additions and concatenations cannot be rebuilt as a chain",
            )

    def expect_activation(self, node: fx.Node, value: Any, what: str = "input") -> None:
        if value is not ACTIVATION:
            raise UnsupportedGraph(node.name, f"its {what} must be the activation")

    def finish(self, node: fx.Node) -> None:
        outputs = node.args[0]
        outputs = list(outputs) if isinstance(outputs, list | tuple) else [outputs]
        if len(outputs) != 1:
            raise UnsupportedGraph(
                "output",
                f"the program returns {len(outputs)} outputs; a classifier returns one "
                "(N, classes) tensor",
            )
        if outputs[0] is not self.activation or self.in_tuple or not self.specs:
            raise UnsupportedGraph("output", "the program does not return the end of its chain")
        if self.rank != 2:
            raise UnsupportedGraph(
                "output",
                f"the program returns {list(self.probe.shape[1:])} values per input; a "
                "classifier returns (N, classes) logits",
            )


# Handlers: one per family of operations --------------------------------------------------


def _conv(walk: _Walk, node: fx.Node) -> None:
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


def _dense(walk: _Walk, node: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
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


def _linear(walk: _Walk, node: fx.Node) -> None:
    a = walk.bind(node)
    walk.expect_activation(node, a["input"])
    _dense(walk, node, walk.tensor(node, a["weight"], "the weight"), a["bias"])


def _addmm(walk: _Walk, node: fx.Node) -> None:
    a = walk.bind(node)
    walk.expect_activation(node, a["mat1"], "first matrix")
    matrix = walk.tensor(node, a["mat2"], "the second matrix")
    bias = walk.tensor(node, a["self"], "the bias")
    _dense(walk, node, a["alpha"] * matrix.t(), a["beta"] * bias)


def _matmul(walk: _Walk, node: fx.Node) -> None:
    a = walk.bind(node)
    names = list(a)
    walk.expect_activation(node, a[names[0]], "first matrix")
    _dense(walk, node, walk.tensor(node, a[names[1]], "the second matrix").t(), None)


def _per_channel(walk: _Walk, node: fx.Node, value: Any) -> torch.Tensor:
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


def _arithmetic(walk: _Walk, node: fx.Node) -> None:
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


def _affine(walk: _Walk, node: fx.Node, scale: torch.Tensor, shift: torch.Tensor) -> None:
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


def _batch_norm(walk: _Walk, node: fx.Node) -> None:
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


def _activation(walk: _Walk, node: fx.Node) -> None:
    kind, params = _ACTIVATIONS[node.target]
    a = walk.bind(node)
    walk.expect_activation(node, a["self"])
    walk.add_layer(node, {"kind": kind, **{name: a[name] for name in params}})


def _pool(walk: _Walk, node: fx.Node) -> None:
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


def _mean(walk: _Walk, node: fx.Node) -> None:
    a = walk.bind(node)
    walk.expect_activation(node, a["self"])
    dims = {int(d) % walk.rank for d in a["dim"]} if walk.rank == 4 else set()
    if dims != {2, 3} or a.get("dtype") is not None:
        raise UnsupportedGraph(node.name, "only a mean over (H, W) of (N, C, H, W) is supported")
    walk.add_layer(node, {"kind": "adaptive_avg_pool", "output_size": [1, 1]})
    if not a["keepdim"]:
        walk.add_layer(node, {"kind": "flatten"})


def _reshape(walk: _Walk, node: fx.Node) -> None:
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


def _identity(walk: _Walk, node: fx.Node) -> None:
    a = walk.bind(node)
    walk.expect_activation(node, next(iter(a.values())))
    if node.target in _DROPOUTS or "dropout" in node.target.name():
        if a.get("train"):
            raise UnsupportedGraph(node.name, "dropout is active (exported in training mode)")
    walk.activation = node
    walk.in_tuple = node.target is aten.native_dropout.default


def _first_output(walk: _Walk, node: fx.Node) -> None:
    if not walk.in_tuple:
        raise UnsupportedGraph(node.name, "indexes into the activation")
    if node.args[1] != 0:
        raise UnsupportedGraph(
            node.name,
            f"uses output {node.args[1]} of {walk.activation.name} (pooling indices, batch "
            "statistics): only the first output is supported",
        )
    walk.activation, walk.in_tuple = node, False


def _log_softmax(walk: _Walk, node: fx.Node) -> None:
    a = walk.bind(node)
    walk.expect_activation(node, a["self"])
    if walk.rank != 2 or int(a["dim"]) % 2 != 1 or a.get("dtype") is not None:
        raise UnsupportedGraph(node.name, "only a log_softmax over the classes is supported")
    walk.add_layer(node, {"kind": "log_softmax"})


def _softmax(walk: _Walk, node: fx.Node) -> None:
    raise UnsupportedGraph(
        node.name,
        "the program ends in softmax, but the service reads outputs as logits: export the "
        "network without its final softmax (or with log_softmax)",
    )


def _handlers() -> dict[Any, Any]:
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


# Entry point ------------------------------------------------------------------------------


def lift(
    program: ExportedProgram,
    input_shape: Sequence[int],
    value_range: tuple[float, float] = (0.0, 1.0),
) -> LiftedNet:
    """Rebuild `program` as a LiftedNet (eval mode) that computes the same outputs.

    input_shape: one input's shape from the manifest ([C, H, W] or [features]);
    value_range: where the check's random inputs are drawn. Raises UnsupportedGraph
    naming the node and the reason (see the module docstring). The result's `sources`
    attribute names the graph node each layer came from.
    """
    net = _Walk(program, tuple(int(d) for d in input_shape)).run()
    verify(program, net, tuple(input_shape), value_range)
    return net


@torch.no_grad()
def verify(
    program: ExportedProgram,
    net: nn.Module,
    input_shape: tuple[int, ...],
    value_range: tuple[float, float],
) -> float:
    """Max |net - program| on random inputs; UnsupportedGraph if above the tolerance."""
    low, high = value_range
    generator = torch.Generator().manual_seed(0)
    x = low + (high - low) * torch.rand(VERIFY_BATCH, *input_shape, generator=generator)
    try:
        expected = program.module()(x)
    except Exception as error:  # noqa: BLE001 - any failure of the user's program
        raise UnsupportedGraph(
            "inputs",
            f"the program fails on a batch of {VERIFY_BATCH} inputs of shape "
            f"{list(input_shape)} (export it with a dynamic batch dimension): {error}",
        ) from None
    expected = expected[0] if isinstance(expected, list | tuple) else expected
    diff = float((net(x).double() - expected.double()).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    if not diff <= VERIFY_TOLERANCE * scale:
        raise UnsupportedGraph(
            "output", f"the rebuilt network differs from the program by {diff:.3g}"
        )
    return diff
