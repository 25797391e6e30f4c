"""Sample encodings: JSON, .npy bytes, a PNG grid for image models. CPU work: callers run
these off the event loop for large batches."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import torch
from PIL import Image


def json_bytes(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def as_lists(samples: torch.Tensor | np.ndarray) -> list:
    """Nested lists of a sample array; float32 values print exactly (via float64)."""
    if isinstance(samples, np.ndarray):
        return samples.astype(np.float64).tolist()
    return samples.double().tolist()


def samples_json(samples: torch.Tensor, stats: dict[str, Any]) -> bytes:
    """{"samples": [...], "stats": {...}}."""
    return json_bytes({"samples": as_lists(samples), "stats": stats})


def npy_bytes(samples: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, samples.numpy(), allow_pickle=False)
    return buffer.getvalue()


def png_bytes(
    samples: torch.Tensor,
    value_range: tuple[float, float] | None,
    scale: int = 4,
    columns: int | None = None,
) -> bytes:
    """A grid of (N, C, H, W) images (C = 1 or 3), one pixel gap, each pixel drawn as a
    scale x scale block (nearest neighbour, so pixels stay sharp); near-square unless
    `columns` is given."""
    images = samples.float()
    low, high = value_range or (float(images.min()), float(images.max()))
    images = ((images - low) / max(high - low, 1e-12)).clamp(0, 1)
    count, channels, height, width = images.shape
    columns = min(columns or math.ceil(math.sqrt(count)), count)
    rows = math.ceil(count / columns)
    grid = torch.ones(channels, rows * (height + 1) + 1, columns * (width + 1) + 1)
    for index in range(count):
        top, left = 1 + (index // columns) * (height + 1), 1 + (index % columns) * (width + 1)
        grid[:, top : top + height, left : left + width] = images[index]
    pixels = (grid * 255).round().byte().permute(1, 2, 0).numpy()  # (H, W, C)
    image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sse_frame(event_id: str | int, name: str, data: dict[str, Any]) -> bytes:
    """One server-sent event; `event_id` is what a client sends back as Last-Event-ID."""
    return f"id: {event_id}\nevent: {name}\ndata: ".encode() + json_bytes(data) + b"\n\n"
