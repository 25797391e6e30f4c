"""KID: the unbiased MMD^2 with the cubic polynomial kernel, subsets as torch-fidelity draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.kid import KID_SEED, kid, mmd2_unbiased, polynomial_kernel


def direct_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased estimator written out pair by pair."""
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    return xx + yy - 2 * xy


def test_polynomial_kernel_is_cubic_in_the_scaled_dot_product():
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0], [0.0, 0.0]])
    np.testing.assert_allclose(polynomial_kernel(x, y).numpy(), [[(1 / 2 + 1) ** 3, 1.0]])


def test_mmd2_matches_the_pairwise_sum():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 4)), rng.normal(1.0, 1.0, size=(7, 4))
    assert mmd2_unbiased(torch.tensor(x), torch.tensor(y)) == pytest.approx(direct_mmd2(x, y))


def test_one_subset_of_all_rows_is_the_plain_estimate():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(9, 3)), rng.normal(size=(9, 3)) * 2
    result = kid(x, y, subsets=1, subset_size=9)  # a subset of all rows is a permutation
    assert result.mean == pytest.approx(direct_mmd2(x, y), rel=1e-5) and result.std == 0.0
    assert (result.subsets, result.subset_size) == (1, 9)


def test_subsets_are_drawn_as_torch_fidelity_draws_them():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(30, 5)), rng.normal(0.5, 1.0, size=(25, 5))
    draws = np.random.RandomState(KID_SEED)
    estimates = []
    for _ in range(4):  # real subset first, then generated, without replacement
        rows_x = draws.choice(30, 10, replace=False)
        rows_y = draws.choice(25, 10, replace=False)
        estimates.append(direct_mmd2(x[rows_x], y[rows_y]))
    result = kid(x, y, subsets=4, subset_size=10)
    assert result.mean == pytest.approx(np.mean(estimates), rel=1e-5)
    assert result.std == pytest.approx(np.std(estimates), rel=1e-4)  # ddof=0


def test_kid_is_near_zero_for_one_distribution_and_large_for_two():
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(2000, 16, generator=gen), torch.randn(2000, 16, generator=gen)
    same = kid(x, y, subsets=10, subset_size=500)
    identical = kid(x, x, subsets=10, subset_size=500)
    shifted = kid(x, y + 0.5, subsets=10, subset_size=500)
    assert abs(same.mean) < 0.01 and abs(identical.mean) < 0.01
    assert shifted.mean > 0.1 and shifted.mean > 20 * abs(same.mean)


def test_kid_refuses_subsets_larger_than_the_sets_and_mismatched_features():
    with pytest.raises(ValueError, match="subset_size"):
        kid(np.zeros((5, 2)), np.zeros((50, 2)), subset_size=10)
    with pytest.raises(ValueError, match="dimensions"):
        kid(np.zeros((50, 2)), np.zeros((50, 3)), subset_size=10)
    with pytest.raises(ValueError, match="finite"):
        kid(np.full((50, 2), np.nan), np.zeros((50, 2)), subset_size=10)
