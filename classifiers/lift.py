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
not reproduce. Residual networks are not lifted (their blocks would need SBP masks shared
across the joined channels). The handlers per operation live in classifiers.lift_ops.

Example:
    program = torch.export.load("classifier.pt2")
    net = lift(program, [1, 8, 8])            # LiftedNet, eval mode
    net.config                                # zoo manifest "config"
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from classifiers.lift_ops import (
    ACTIVATION,
    BATCH,
    MULTIPLIES,
    SIGMOIDS,
    SIZE_OPS,
    SYMBOLIC,
    UnsupportedGraph,
    aten,
    handlers,
)
from classifiers.lifted import LiftedNet, make_layer

VERIFY_BATCH = 5  # rows of the random inputs the rebuilt network is checked on
VERIFY_TOLERANCE = 1e-4  # max |rebuilt - program|, relative to the outputs' size

__all__ = ["UnsupportedGraph", "lift", "verify"]


class GraphWalk:
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
        table = handlers()
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
            elif node.target in SIZE_OPS:
                batch = node.target is aten.sym_size.int and node.args[1] == 0
                self.symbolic[node] = BATCH if batch else SYMBOLIC
            elif not self.depends_on_input(node):
                if any(arg in self.symbolic for arg in node.all_input_nodes):
                    self.symbolic[node] = SYMBOLIC
                elif node.users:
                    self.fold_constant(node)
            elif not self.silu_pattern(node):
                self.check_single_consumer(node)
                handler = table.get(node.target)
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
        if node.target not in SIGMOIDS or node.args[0] is not x or self.in_tuple:
            return False
        users = [user for user in x.users if user.target not in SIZE_OPS]
        product = next((user for user in users if user is not node), None)
        if len(users) != 2 or product is None or product.target not in MULTIPLIES:
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
            if user.target not in SIZE_OPS
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
    net = GraphWalk(program, tuple(int(d) for d in input_shape)).run()
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
