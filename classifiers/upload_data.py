"""Read and check the data a user uploads for a classifier job, before any work starts.

A file is safetensors or `.npz` (never unpickled) holding `x` (inputs, (N, *input_shape))
and, for labelled data, `y` (integer labels in [0, classes)); out-of-domain data holds
`x` only. Sizes come from the headers and are checked against `max_bytes` and
`max_rows` BEFORE any array is read, so an upload that promises a huge array costs
nothing. Then: the shapes against the manifest's input shape, labels, and finite inputs
inside the manifest's value range (with a tolerance).

Every problem is a `BadData(field, message)`, field like "train.x" or "held_out.y", for
the service to answer with a 422.

Example:
    limits = DataLimits(max_bytes=64 << 20, max_rows=100_000)
    train = read_dataset(path, "train", input_shape=[1, 8, 8], classes=10,
                         value_range=(0.0, 1.0), limits=limits)
    train, held_out = split_held_out(train, fraction=0.2, seed=0)
"""

from __future__ import annotations

import io
import json
import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from safetensors.numpy import load as load_safetensors_bytes

SAFETENSORS_DTYPES = {  # the safetensors dtypes that are plain numbers, and their sizes
    "F16": 2, "BF16": 2, "F32": 4, "F64": 8,
    "I8": 1, "I16": 2, "I32": 4, "I64": 8, "U8": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
INTEGER_DTYPES = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"}
MAX_HEADER_BYTES = 1 << 20  # a safetensors header of two or three arrays is tiny
NUMERIC_KINDS = "fiu"
RANGE_TOLERANCE = 1e-3  # inputs may exceed the value range by this fraction of its width


class BadData(ValueError):
    """Unusable uploaded data (or a job setting that does not fit it); `field` says where."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class DataLimits:
    max_bytes: int  # of the whole file, and of the arrays it holds once read
    max_rows: int  # inputs per file


@dataclass(frozen=True)
class Dataset:
    x: torch.Tensor  # (N, *input_shape) float32
    y: torch.Tensor | None  # (N,) int64, None for out-of-domain data

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class _ArrayHeader:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, or numpy dtype string for .npz
    integer: bool
    nbytes: int


# Headers -------------------------------------------------------------------------------


def _safetensors_headers(data: bytes, field: str) -> dict[str, _ArrayHeader]:
    if len(data) < 8:
        raise BadData(field, "not a safetensors or .npz file (too short)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(MAX_HEADER_BYTES, len(data) - 8):
        raise BadData(field, "not a safetensors or .npz file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadData(field, "not a safetensors or .npz file (unreadable header)") from None
    if not isinstance(header, dict):
        raise BadData(field, "not a safetensors file (the header is not a table)")
    arrays = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if dtype not in SAFETENSORS_DTYPES or not isinstance(shape, list):
            raise BadData(f"{field}.{name}", f"dtype {dtype} is not a plain number type")
        nbytes = math.prod(int(d) for d in shape) * SAFETENSORS_DTYPES[dtype]
        arrays[name] = _ArrayHeader(tuple(int(d) for d in shape), dtype, dtype in INTEGER_DTYPES,
                                    nbytes)  # fmt: skip
    return arrays


def _npy_header(stream: BinaryIO, name: str, field: str) -> _ArrayHeader:
    try:
        version = np.lib.format.read_magic(stream)
        reader = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = reader(stream)
    except (ValueError, OSError, EOFError) as error:
        raise BadData(f"{field}.{name}", f"not a readable .npy array: {error}") from None
    if dtype.hasobject or dtype.kind not in NUMERIC_KINDS:
        raise BadData(f"{field}.{name}", f"dtype {dtype} is not a plain number type")
    return _ArrayHeader(tuple(shape), str(dtype), dtype.kind in "iu",
                        math.prod(shape) * dtype.itemsize)  # fmt: skip


def _npz_headers(archive: zipfile.ZipFile, field: str) -> dict[str, _ArrayHeader]:
    arrays = {}
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            raise BadData(field, f"the .npz holds {info.filename}, not a .npy array")
        name = info.filename[: -len(".npy")]
        with archive.open(info) as stream:
            arrays[name] = _npy_header(stream, name, field)
    return arrays


def _check_sizes(
    arrays: dict[str, _ArrayHeader], keys: tuple[str, ...], limits: DataLimits, field: str
) -> None:
    missing = [key for key in keys if key not in arrays]
    if missing:
        raise BadData(f"{field}.{missing[0]}", f"missing (the file holds {sorted(arrays)})")
    total = sum(arrays[key].nbytes for key in keys)
    if total > limits.max_bytes:
        raise BadData(field, f"the arrays hold {total} bytes, more than {limits.max_bytes}")
    for key in keys:
        shape = arrays[key].shape
        if not shape or shape[0] > limits.max_rows:
            raise BadData(
                f"{field}.{key}", f"shape {list(shape)}: at most {limits.max_rows} rows allowed"
            )


# Reading -------------------------------------------------------------------------------


def read_arrays(
    source: bytes | str | Path, field: str, keys: tuple[str, ...], limits: DataLimits
) -> dict[str, np.ndarray]:
    """The arrays `keys` of a safetensors or .npz file (path or bytes), sizes checked first.

    Other arrays in the file are ignored (and never read). Raises BadData.
    """
    if isinstance(source, str | Path):
        size = Path(source).stat().st_size
        if size > limits.max_bytes:
            raise BadData(field, f"the file has {size} bytes, more than {limits.max_bytes}")
        source = Path(source).read_bytes()
    if len(source) > limits.max_bytes:
        raise BadData(field, f"the file has {len(source)} bytes, more than {limits.max_bytes}")
    if zipfile.is_zipfile(io.BytesIO(source)):
        return _read_npz(source, field, keys, limits)
    arrays = _safetensors_headers(source, field)
    _check_sizes(arrays, keys, limits, field)
    try:
        loaded = load_safetensors_bytes(source)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise BadData(field, f"not a readable safetensors file: {error}") from None
    return {key: loaded[key] for key in keys}


def _read_npz(
    data: bytes, field: str, keys: tuple[str, ...], limits: DataLimits
) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            arrays = _npz_headers(archive, field)
        _check_sizes(arrays, keys, limits, field)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {key: npz[key] for key in keys}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        if isinstance(error, BadData):
            raise
        raise BadData(field, f"not a readable .npz file: {error}") from None


# Checks --------------------------------------------------------------------------------


def check_inputs(
    x: np.ndarray,
    field: str,
    input_shape: list[int] | tuple[int, ...],
    value_range: tuple[float, float],
    tolerance: float = RANGE_TOLERANCE,
) -> torch.Tensor:
    """(N, *input_shape) float32 inputs, finite and inside the value range (give or take
    `tolerance` of its width); BadData otherwise."""
    if x.dtype.kind not in NUMERIC_KINDS:
        raise BadData(field, f"inputs must be numbers, got {x.dtype}")
    if tuple(x.shape[1:]) != tuple(input_shape) or x.ndim == 0 or x.shape[0] == 0:
        shape = ", ".join(map(str, input_shape))
        raise BadData(field, f"inputs must have shape (N, {shape}) with N >= 1, got {x.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if not torch.isfinite(tensor).all():
        raise BadData(field, "inputs contain NaN or infinite values (as float32)")
    low, high = value_range
    slack = tolerance * (high - low)
    smallest, largest = float(tensor.min()), float(tensor.max())
    if smallest < low - slack or largest > high + slack:
        raise BadData(
            field,
            f"inputs span [{smallest:.4g}, {largest:.4g}], outside the manifest's value range "
            f"[{low:g}, {high:g}]",
        )
    return tensor


def check_labels(y: np.ndarray, field: str, rows: int, classes: int) -> torch.Tensor:
    """(rows,) int64 labels in [0, classes); BadData otherwise."""
    if y.dtype.kind not in "iu":
        raise BadData(field, f"labels must be integers, got {y.dtype}")
    if y.shape != (rows,):
        raise BadData(field, f"labels must have shape ({rows},) like the inputs, got {y.shape}")
    if rows and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise BadData(
            field, f"labels span [{int(y.min())}, {int(y.max())}]; they must be in [0, {classes})"
        )
    return torch.from_numpy(y.astype(np.int64))


def read_dataset(
    source: bytes | str | Path,
    field: str,
    *,
    input_shape: list[int] | tuple[int, ...],
    classes: int,
    value_range: tuple[float, float],
    limits: DataLimits,
    labelled: bool = True,
    tolerance: float = RANGE_TOLERANCE,
) -> Dataset:
    """Read and check one uploaded file: `x` and `y` (labelled) or `x` alone."""
    keys = ("x", "y") if labelled else ("x",)
    arrays = read_arrays(source, field, keys, limits)
    x = check_inputs(arrays["x"], f"{field}.x", input_shape, value_range, tolerance)
    y = check_labels(arrays["y"], f"{field}.y", len(x), classes) if labelled else None
    return Dataset(x, y)


def require_labels(data: Dataset, field: str) -> None:
    """BadData unless `data` is labelled (training and held-out sets must be)."""
    if data.y is None:
        raise BadData(f"{field}.y", "labels are needed")


def split_held_out(data: Dataset, fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, held out): a seeded random `fraction` of the rows is held out."""
    if not 0.0 < fraction < 1.0:
        raise BadData("held_out_fraction", f"must be in (0, 1), got {fraction}")
    held = max(1, round(fraction * len(data)))
    if held >= len(data):
        raise BadData("train", f"{len(data)} inputs are too few to hold {fraction:.0%} out")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    train_rows, held_rows = order[held:], order[:held]

    def rows(index: torch.Tensor) -> Dataset:
        return Dataset(data.x[index], data.y[index] if data.y is not None else None)

    return rows(train_rows), rows(held_rows)
