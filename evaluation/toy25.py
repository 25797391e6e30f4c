"""25-Gaussians sample quality, the convention of DRS (Azadi et al., 2019) and MH-GAN.

The target has 25 modes on {-2,-1,0,1,2}^2 with std 0.05, in the
grid's own coordinates (no rescaling anywhere in the project). A sample is high
quality (HQ) when it lies within 4 std (distance <= 0.2) of its nearest mode, which it
is then assigned to. Reported:

- high_quality_rate: fraction of samples that are HQ.
- modes_covered: modes with at least `min_count` HQ samples (default 1, as in DRS's
  "modes recovered"; mode-collapse papers in the VEEGAN line ask for more).
- within_mode_std: per-coordinate std of HQ samples around their assigned mode,
  computed per covered mode and averaged over them (0.05 for perfect samples, a touch
  less because the 4-std cut drops the far tail).
- jsd_from_uniform: Jensen-Shannon divergence, in nats (natural log, so at most
  ln 2 = 0.693), between the histogram of HQ samples over modes and the uniform
  distribution over the 25 modes.

Example:
    >>> import torch
    >>> metrics = toy25_metrics(toy25_sample(5000, torch.Generator().manual_seed(0)))
    >>> metrics.modes_covered
    25
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from evaluation.frechet import as_float64

TOY25_STD = 0.05
TOY25_MEANS = np.array([(x, y) for x in range(-2, 3) for y in range(-2, 3)], dtype=np.float32)
HIGH_QUALITY_STDS = 4.0  # distance threshold in units of the mode std
GRID = np.arange(-2, 3)  # the modes are GRID x GRID, first coordinate outer
assert np.array_equal(TOY25_MEANS, [(x, y) for x in GRID for y in GRID]), "unexpected mode order"


class Toy25Metrics(NamedTuple):
    high_quality_rate: float  # fraction of samples within 4 std of a mode
    modes_covered: int  # modes with at least min_count HQ samples
    within_mode_std: float  # mean over covered modes of the per-coordinate HQ std
    jsd_from_uniform: float  # nats; ln 2 when no sample is HQ
    mode_counts: tuple[int, ...]  # HQ samples per mode, in TOY25_MEANS order
    count: int  # samples evaluated


def toy25_sample(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n points of the 25-Gaussians mixture (uniform over modes), shape (n, 2)."""
    means = torch.from_numpy(TOY25_MEANS)
    modes = torch.randint(0, len(means), (n,), generator=generator)
    noise = torch.randn(n, 2, generator=generator)
    return means[modes] + TOY25_STD * noise


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in nats between two histograms (normalised here)."""
    p = p / p.sum()
    q = q / q.sum()
    middle = (p + q) / 2

    def kl_to_middle(a: np.ndarray) -> float:
        support = a > 0  # 0 log 0 = 0
        return float(np.sum(a[support] * np.log(a[support] / middle[support])))

    return 0.5 * kl_to_middle(p) + 0.5 * kl_to_middle(q)


def toy25_metrics(samples: Any, *, min_count: int = 1) -> Toy25Metrics:
    """Quality metrics of 2-D samples (N, 2) (numpy or torch) against the 25 Gaussians."""
    points = as_float64(samples, "samples")
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] == 0:
        raise ValueError(f"samples must have shape (N, 2) with N > 0, got {points.shape}")
    means = TOY25_MEANS.astype(np.float64)  # (25, 2)
    # On a product grid the nearest mode is the nearest grid value per coordinate: O(N)
    # time and memory, for batch jobs over millions of samples.
    finite = np.isfinite(points).all(axis=1)  # a NaN sample is simply not high quality
    points = np.where(finite[:, None], points, np.inf)
    grid_index = np.clip(np.rint(points), GRID[0], GRID[-1]).astype(np.int64) - GRID[0]  # (N, 2)
    nearest = grid_index[:, 0] * len(GRID) + grid_index[:, 1]
    distance = np.linalg.norm(points - means[nearest], axis=1)
    high_quality = distance <= HIGH_QUALITY_STDS * TOY25_STD

    modes = nearest[high_quality]
    counts = np.bincount(modes, minlength=len(means))
    covered = counts >= max(min_count, 1)

    offsets = points[high_quality] - means[modes]  # (n_hq, 2)
    squared = np.bincount(modes, weights=(offsets**2).sum(axis=1), minlength=len(means))
    # Per coordinate: divide the summed squared 2-D offset by 2 * count.
    per_mode_std = np.sqrt(squared[covered] / (2 * counts[covered]))
    within_mode_std = float(per_mode_std.mean()) if covered.any() else math.nan

    uniform = np.ones(len(means))
    jsd = jensen_shannon(counts.astype(np.float64), uniform) if counts.sum() else math.log(2)
    return Toy25Metrics(
        high_quality_rate=float(high_quality.mean()),
        modes_covered=int(covered.sum()),
        within_mode_std=within_mode_std,
        jsd_from_uniform=jsd,
        mode_counts=tuple(int(c) for c in counts),
        count=len(points),
    )
