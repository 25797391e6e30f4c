"""Load model files without ever running code hidden in them.

Pickle can execute arbitrary code on load, so no file is unpickled: weights are
safetensors, statistics `.npz` read with allow_pickle=False, metadata JSON.

`torch.export.load` is NOT safe on its own (torch 2.13, torch/export/pt2_archive):
- payloads flagged `use_pickle`, custom and opaque objects are loaded with
  `torch.load(weights_only=False)`, `torch._C._pickle_load_obj` or `pickle.loads`;
- the sample inputs are `torch.load`-ed with weights_only=True but, if that fails,
  again with weights_only=False;
- the legacy (pre-2.7) zip layout unpickles its state dict;
- AOTInductor packages load compiled shared libraries;
- a graph node's target is resolved by walking attributes from `torch`, so a node
  targeting "torch.os.system" would call os.system when the program runs.
`check_pt2` therefore inspects the archive before torch sees it and refuses all of the
above: only the current archive layout, raw-tensor payloads, sample inputs that load
under weights_only=True, and graph targets from an allowlist (pure tensor math from
ATen, service/models/operators.py; arithmetic from `operator` and `math`; symbolic-shape
helpers). Reads are bounded: every archive member's size comes from the zip directory
and is checked before the member is read, so a small file that inflates to gigabytes
(a zip bomb, a huge JSON) is refused without being unpacked.
"""

from __future__ import annotations

import io
import json
import math
import operator
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from service.errors import BadModelFile, UnsafeModelFile
from service.models.operators import allowed_aten

PICKLE_PROTOCOL_MARKER = 0x80  # first byte of every pickle stream of protocol >= 2
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib", ".dill", ".npy")

_OPERATOR_TARGETS = {
    f"_operator.{name}"
    for name in (
        "getitem add sub mul truediv floordiv mod pow neg pos abs eq ne lt le gt ge "
        "and_ or_ xor not_ invert lshift rshift"
    ).split()
    if hasattr(operator, name)
}
_SYMBOLIC_TARGETS = {
    f"torch.{name}"
    for name in "sym_float sym_int sym_max sym_min sym_not sym_ite sym_sqrt sym_sum".split()
}
MAX_JSON_BYTES = 64 * 2**20  # a program's graph description, or a manifest's side file
MAX_MEMBER_BYTES = 4 * 2**30  # any one archive member, unpacked
MAX_ELEMENTS = 2**28  # of any tensor a program's graph makes (1 GiB of float32)
MAX_INFLATION = 200  # unpacked / packed size of a compressed member (text compresses ~10x)


def refuse_pickle(path: Path, shown_name: str) -> None:
    """Raise UnsafeModelFile for pickle extensions or bytes that start a pickle stream."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeModelFile(
            f"{shown_name}: {path.suffix} files are pickles and are never loaded; "
            "export the model with torch.export (.pt2) or save weights as .safetensors"
        )
    with path.open("rb") as file:
        head = file.read(9)
    if _safetensors_head(head, path.stat().st_size):
        return  # its 8-byte header length may well start with 0x80: not a pickle
    if len(head) >= 2 and head[0] == PICKLE_PROTOCOL_MARKER and 2 <= head[1] <= 5:
        raise UnsafeModelFile(f"{shown_name} is a pickle stream; pickles are never loaded")


def _safetensors_head(head: bytes, file_size: int) -> bool:
    """The first bytes of a safetensors file: a little-endian u64 header length that fits
    the file, then the header's opening brace."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 8 + int.from_bytes(head[:8], "little") <= file_size


def check_pt2(path: Path, shown_name: str) -> None:
    """Refuse a .pt2 archive unless loading and running it cannot execute foreign code."""
    refuse_pickle(path, shown_name)
    if not zipfile.is_zipfile(path):
        raise BadModelFile(f"{shown_name} is not a torch.export archive (not a zip file)")
    try:
        with zipfile.ZipFile(path) as archive:
            check_sizes(archive, shown_name)
            _check_archive(archive, shown_name)
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise BadModelFile(f"{shown_name} is a damaged torch.export archive: {error}") from None


def check_sizes(archive: zipfile.ZipFile, shown_name: str) -> None:
    """Refuse members whose unpacked size is out of bounds, before any is read."""
    for info in archive.infolist():
        inflation = info.file_size / max(info.compress_size, 1)
        json_too_big = info.filename.endswith(".json") and info.file_size > MAX_JSON_BYTES
        if info.file_size > MAX_MEMBER_BYTES or json_too_big or inflation > MAX_INFLATION:
            raise BadModelFile(
                f"{shown_name}: {info.filename} unpacks to {info.file_size} bytes "
                f"({inflation:.0f}x its packed size); refused"
            )


def _check_archive(archive: zipfile.ZipFile, shown_name: str) -> None:
    names = archive.namelist()
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        raise BadModelFile(f"{shown_name}: not a torch.export.save archive")
    root = roots.pop() + "/"
    inner = [name[len(root) :] for name in names]
    if "archive_format" not in inner or "models/model.json" not in inner:
        raise UnsafeModelFile(
            f"{shown_name}: not the current torch.export archive layout (older layouts "
            "unpickle their weights); re-save it with torch.export.save on torch >= 2.7"
        )
    for name in inner:
        if name.startswith(("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model")):
            raise UnsafeModelFile(f"{shown_name}: compiled packages are not accepted ({name})")
        if name.startswith(("data/weights/", "data/constants/")) and name.endswith(".pt"):
            raise UnsafeModelFile(f"{shown_name}: pickled legacy weights ({name})")
        if name.startswith("models/") and name.endswith(".json"):
            _check_targets(json.loads(archive.read(root + name)), shown_name)
        if name.endswith(("_weights_config.json", "_constants_config.json")):
            _check_payloads(json.loads(archive.read(root + name)), shown_name)
        if name.startswith("data/sample_inputs/"):
            try:  # the same bytes later load with weights_only=True, never the fallback
                torch.load(io.BytesIO(archive.read(root + name)), weights_only=True)
            except Exception as error:
                raise UnsafeModelFile(
                    f"{shown_name}: sample inputs need unpickling beyond plain tensors ({error})"
                ) from None


def _check_payloads(config: dict[str, Any], shown_name: str) -> None:
    for fqn, payload in config.get("config", {}).items():
        if payload.get("use_pickle") or not str(payload.get("path_name", "")).startswith(
            ("weight_", "tensor_")
        ):
            raise UnsafeModelFile(f"{shown_name}: {fqn} is stored as a pickled object")


def _check_targets(tree: Any, shown_name: str) -> None:
    """Every string under a "target" key anywhere in the program must be allowlisted, and
    no tensor or size argument may be large enough to exhaust memory when it runs."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            target = node.get("target")
            if isinstance(target, str) and not _allowed_target(target):
                raise UnsafeModelFile(
                    f"{shown_name}: the program calls {target!r}, which is not on the list "
                    "of pure tensor operators an uploaded program may use"
                )
            for key in ("sizes", "as_ints"):
                if isinstance(node.get(key), list) and _elements(node[key]) > MAX_ELEMENTS:
                    raise BadModelFile(
                        f"{shown_name}: the program makes a tensor of {_elements(node[key])} "
                        f"elements (more than {MAX_ELEMENTS}); refused"
                    )
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _elements(sizes: list[Any]) -> int:
    """The product of a size list: plain ints, or symbolic sizes at their example value."""
    total = 1
    for size in sizes:
        if isinstance(size, dict):
            size = size.get("as_int", (size.get("as_expr") or {}).get("hint", {}).get("as_int"))
        if isinstance(size, int) and not isinstance(size, bool):
            total *= max(size, 1)
    return total


def _allowed_target(target: str) -> bool:
    if target in _OPERATOR_TARGETS or target in _SYMBOLIC_TARGETS:
        return True
    if target.startswith("math.") and callable(getattr(math, target[5:], None)):
        return True
    return allowed_aten(target)


def load_program(path: Path, shown_name: str) -> torch.export.ExportedProgram:
    """check_pt2, then torch.export.load: the program, on the CPU."""
    check_pt2(path, shown_name)
    try:
        return torch.export.load(str(path))
    except Exception as error:
        raise BadModelFile(f"{shown_name}: torch.export.load failed: {error}") from None


def load_exported(path: Path, shown_name: str, device: torch.device) -> torch.nn.Module:
    """load_program, then its module on `device`."""
    program = load_program(path, shown_name)
    try:
        if device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        return ExportedModule(program.module())
    except Exception as error:
        raise BadModelFile(f"{shown_name}: torch.export.load failed: {error}") from None


class ExportedModule(torch.nn.Module):
    """An exported program's module. Its train/eval mode was fixed when it was exported
    (torch refuses to switch it), so switching it here is a no-op: code that puts any
    model in eval mode before predicting runs on uploaded programs too."""

    def __init__(self, program_module: torch.nn.Module):
        super().__init__()
        self.program = program_module

    def train(self, mode: bool = True) -> ExportedModule:
        return self

    def forward(self, *args: Any) -> Any:
        return self.program(*args)


def load_safetensors(path: Path, shown_name: str, device: torch.device) -> dict[str, torch.Tensor]:
    refuse_pickle(path, shown_name)
    try:
        with safe_open(str(path), framework="pt"):
            pass  # parses the header: a malformed file fails here with a clear message
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as error:
        raise BadModelFile(f"{shown_name} is not a readable safetensors file: {error}") from None


def load_npz(
    path: Path, shown_name: str, max_bytes: int = MAX_MEMBER_BYTES
) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, refusing one that unpacks past `max_bytes`."""
    refuse_pickle(path, shown_name)
    try:
        with zipfile.ZipFile(path) as archive:
            check_sizes(archive, shown_name)
            if sum(info.file_size for info in archive.infolist()) > max_bytes:
                raise BadModelFile(f"{shown_name} unpacks to more than {max_bytes} bytes")
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise BadModelFile(f"{shown_name} is not a readable .npz file: {error}") from None


def load_json(path: Path, shown_name: str) -> Any:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise BadModelFile(f"{shown_name} is larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise BadModelFile(f"{shown_name} is not valid JSON: {error}") from None
