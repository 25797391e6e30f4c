"""The built-in model store shipped inside the package: zoo/store/<name>/<version>/.

Example:
    >>> manifest = read_manifest("toy25")
    >>> generator = load("toy25")           # nn.Module in eval mode
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from architectures import build

STORE = Path(__file__).resolve().parent / "store"


def model_dir(name: str, version: str | None = None, store: Path = STORE) -> Path:
    """The folder of `name` at `version` (default: the highest version present)."""
    root = store / name
    if version is None:
        versions = sorted((p.name for p in root.iterdir() if p.is_dir()), key=_version_key)
        if not versions:
            raise FileNotFoundError(f"no versions of {name!r} in {store}")
        version = versions[-1]
    return root / version


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)


def read_manifest(name: str, version: str | None = None, store: Path = STORE) -> dict[str, Any]:
    return json.loads((model_dir(name, version, store) / "manifest.json").read_text())


def load(
    name: str, version: str | None = None, device: str | torch.device = "cpu", store: Path = STORE
) -> nn.Module:
    """Build a `"format": "zoo"` model with its weights (classifier transforms included)."""
    folder = model_dir(name, version, store)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest.get("format") == "zoo", f"{name} is not a zoo-format model"
    weights = folder / manifest["weights"]
    if manifest.get("transform") == "sbn":
        from classifiers.sbn import convert

        model = convert(build(manifest["architecture"], manifest.get("config")))
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(weights)))
        return model.to(device).eval()
    return build(manifest["architecture"], manifest.get("config"), weights, device)


def names(store: Path = STORE) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.is_dir()) if store.exists() else []
