"""Improved precision and recall (Kynkaanniemi et al. 2019): k-NN balls around each set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.precision_recall import knn_radii, precision_recall


def brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(points):
        d = np.linalg.norm(points[:, None] - points[None], axis=2)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def share_inside(manifold, radius, queries):
        d = np.linalg.norm(queries[:, None] - manifold[None], axis=2)
        return (d <= radius[None]).any(axis=1).mean()

    return (
        share_inside(real, radii(real), fake),
        share_inside(fake, radii(fake), real),
    )


def test_a_hand_computed_case_on_a_line():
    real = np.array([[0.0], [1.0], [2.0], [4.0]])  # nearest-other radii 1, 1, 1, 2
    fake = np.array([[0.5], [3.0], [7.0], [-2.0]])  # radii 2.5, 2.5, 4, 2.5
    result = precision_recall(real, fake, k=1)
    # 0.5 and 3 lie in real balls, 7 and -2 do not; every real point lies in a fake ball.
    assert (result.precision, result.recall, result.k) == (0.5, 1.0, 1)


def test_blocks_and_k_agree_with_a_brute_force_computation():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(60, 5)), rng.normal(0.7, 1.3, size=(45, 5))
    for k in (1, 3, 5):
        result = precision_recall(real, fake, k=k, block_rows=7)
        expected = brute_force(real, fake, k)
        assert (result.precision, result.recall) == pytest.approx(expected)


def test_identical_sets_score_one_and_disjoint_sets_zero():
    points = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    assert precision_recall(points, points)[:2] == (1.0, 1.0)
    assert precision_recall(points, points + 100.0)[:2] == (0.0, 0.0)


def test_a_collapsed_generator_has_precision_but_no_recall():
    gen = torch.Generator().manual_seed(2)
    real = torch.randn(500, 4, generator=gen)
    collapsed = 0.05 * torch.randn(500, 4, generator=gen)  # all near one real mode
    result = precision_recall(real, collapsed)
    assert result.precision > 0.9 and result.recall < 0.2


def test_k_must_leave_a_neighbour():
    with pytest.raises(ValueError, match="k must lie"):
        knn_radii(torch.zeros(3, 2, dtype=torch.float64), k=3)
