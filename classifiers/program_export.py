"""Export a classifier as a torch.export program with a dynamic batch dimension.

The service serves "format": "torch.export" classifiers from `.pt2` files written by
`torch.export.save`, and admits an uploaded program only if every graph target is an
allowlisted operator; `program_ops` lists a program's targets so a caller can check.

Example:
    program = export_classifier(small, (1, 8, 8))
    data = program_bytes(program)               # .pt2 bytes for the model store
    torch.export.load(io.BytesIO(data)).module()(x)
"""

from __future__ import annotations

import io

import torch
from torch import nn
from torch.export import ExportedProgram

EXAMPLE_BATCH = 2


def export_classifier(model: nn.Module, input_shape: tuple[int, ...]) -> ExportedProgram:
    """torch.export of `model` in eval mode, batch dimension dynamic (1 and up)."""
    model = model.eval()
    example = torch.zeros(EXAMPLE_BATCH, *input_shape, device=_device(model))
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def program_bytes(program: ExportedProgram) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def load_program_bytes(data: bytes) -> ExportedProgram:
    """torch.export.load from bytes; only for programs this process wrote (uploads go
    through the service's archive checks first)."""
    return torch.export.load(io.BytesIO(data))


def program_ops(program: ExportedProgram) -> list[str]:
    """Sorted graph targets of the program's call_function nodes, as the archive names
    them ("torch.ops.aten.conv2d.default", "_operator.getitem")."""
    targets = set()
    for node in program.graph.nodes:
        if node.op == "call_function":
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                targets.add(f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}")
            else:
                targets.add(f"{target.__module__}.{target.__name__}")
    return sorted(targets)


def _device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
