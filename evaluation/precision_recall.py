"""Improved precision and recall (Kynkaanniemi et al. 2019) from k-NN manifolds of features.

Each set of feature vectors stands for its manifold: the union of balls around its rows,
each ball's radius the distance to that row's k-th nearest neighbour within the set (the
row itself not counted; k = 3 by default, as in the paper and NVlabs' code).

- precision: the share of generated rows inside the real manifold (quality);
- recall: the share of real rows inside the generated manifold (coverage).

A row is inside a manifold when it lies within at least one ball (distance <= radius).
Both sets should have the same size, as in the paper, because radii shrink with more rows.
Distances are Euclidean, computed in float64 in blocks of rows, so 10k x 10k sets need
no more than a few hundred MB.

Example:
    >>> result = precision_recall(real_features, fake_features)   # k = 3
    >>> result.precision, result.recall
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from evaluation.kid import feature_rows

DEFAULT_K = 3
BLOCK_ROWS = 1024


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float
    k: int


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 for every pair of rows (n, m), never below zero."""
    square = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return square.clamp_min_(0)


def knn_radii(features: torch.Tensor, k: int = DEFAULT_K, block_rows: int = BLOCK_ROWS):
    """Squared distance from each row to its k-th nearest other row of the same set: (N,)."""
    if not 1 <= k < len(features):
        raise ValueError(f"k must lie in [1, {len(features) - 1}] for {len(features)} rows")
    radii = []
    for start in range(0, len(features), block_rows):
        block = squared_distances(features[start : start + block_rows], features)  # (b, N)
        # Position 0 of the sorted row is the row itself (distance 0), so index k is the
        # k-th neighbour; a duplicate row also counts as a neighbour, as in NVlabs' code.
        radii.append(block.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def inside_manifold(
    manifold: torch.Tensor,
    radii: torch.Tensor,
    queries: torch.Tensor,
    block_rows: int = BLOCK_ROWS,
) -> torch.Tensor:
    """Whether each query row lies within some ball (manifold row, radius): bool (Q,)."""
    inside = []
    for start in range(0, len(queries), block_rows):
        block = squared_distances(queries[start : start + block_rows], manifold)  # (b, N)
        inside.append((block <= radii[None, :]).any(dim=1))
    return torch.cat(inside) if inside else torch.zeros(0, dtype=torch.bool)


def precision_recall(
    real_features: Any,
    fake_features: Any,
    k: int = DEFAULT_K,
    block_rows: int = BLOCK_ROWS,
) -> PrecisionRecall:
    """Precision and recall of generated features against real ones, (N, d) and (M, d)."""
    real, fake = feature_rows(real_features, "real"), feature_rows(fake_features, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} and {fake.shape[1]}")
    fake = fake.to(real.device)
    real_radii = knn_radii(real, k, block_rows)
    fake_radii = knn_radii(fake, k, block_rows)
    precision = inside_manifold(real, real_radii, fake, block_rows).double().mean()
    recall = inside_manifold(fake, fake_radii, real, block_rows).double().mean()
    return PrecisionRecall(float(precision), float(recall), k)
