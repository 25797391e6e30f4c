"""Arrays in Redis entries, and array files written piece by piece.

An array travels as three fields: dtype (numpy name), shape ("3,2"), data (raw C-order
bytes). Result files are streamed: `npy_header` / `safetensors_header` come first, then
each piece's raw bytes in order, so a large result is never built in memory.

Example:
    >>> fields = pack(np.zeros((3, 2), np.float32))
    >>> unpack(fields).shape
    (3, 2)
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch

SAFETENSORS_DTYPES = {"float32": "F32", "float64": "F64", "int64": "I64", "int32": "I32"}


def pack(array: np.ndarray | torch.Tensor, prefix: str = "") -> dict[str, Any]:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.ascontiguousarray(array)
    return {
        f"{prefix}dtype": array.dtype.name,
        f"{prefix}shape": ",".join(str(n) for n in array.shape),
        f"{prefix}data": array.tobytes(),
    }


def unpack(fields: dict[bytes | str, Any], prefix: str = "") -> np.ndarray:
    get = lambda name: fields.get(f"{prefix}{name}".encode(), fields.get(f"{prefix}{name}"))  # noqa: E731
    dtype = np.dtype(text(get("dtype")))
    return np.frombuffer(get("data"), dtype=dtype).reshape(parse_shape(get("shape")))


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The bytes np.save writes before the data of a C-order array of this dtype and shape."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)}  # fmt: skip
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def safetensors_header(arrays: list[tuple[str, np.dtype, tuple[int, ...]]]) -> bytes:
    """The header of a .safetensors file holding these arrays, in this order, back to back."""
    entries, offset = {}, 0
    for name, dtype, shape in arrays:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        code = SAFETENSORS_DTYPES[np.dtype(dtype).name]
        entries[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text


def parse_shape(value: bytes | str) -> tuple[int, ...]:
    """The tuple a `shape` field ("3,2"; "" for a scalar) stands for."""
    value = text(value)
    return tuple(int(n) for n in value.split(",")) if value else ()


def text(value: bytes | str) -> str:
    """Redis answers bytes; keys and ids are text."""
    return value.decode() if isinstance(value, bytes) else value
