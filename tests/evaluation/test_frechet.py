import numpy as np
import pytest
import scipy.linalg
import torch

from evaluation.frechet import (
    CovarianceFactor,
    FrechetReference,
    covariance_factor,
    frechet_distance,
    trace_sqrt_product,
)


def sqrtm_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's calculate_frechet_distance (float64 scipy sqrtm of the product)."""
    product_root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    difference = mu1 - mu2
    return float(
        difference @ difference
        + np.trace(sigma1)
        + np.trace(sigma2)
        - 2 * np.trace(product_root).real
    )


def random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    mixing = rng.standard_normal((dim, dim))
    return mixing @ mixing.T / dim + 0.05 * np.eye(dim)


@pytest.mark.parametrize("dim", [1, 3, 16, 64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_matches_scipy_sqrtm_on_random_spd(dim, seed):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    sigma1, sigma2 = random_spd(rng, dim), random_spd(rng, dim)
    expected = sqrtm_frechet(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def test_frechet_is_symmetric_in_its_two_distributions():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    sigma1, sigma2 = random_spd(rng, 10), random_spd(rng, 10)
    forward = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(forward, rel=1e-10)


def test_frechet_of_equal_distributions_is_zero():
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(32), random_spd(rng, 32)
    assert frechet_distance(mu, sigma, mu, sigma) < 1e-9 * np.trace(sigma)


def test_frechet_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(5)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    var1, var2 = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    result = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert result == pytest.approx(expected, rel=1e-12)


def test_frechet_closed_form_holds_for_singular_diagonal_covariances():
    var1 = np.array([0.0, 1.0, 0.0, 4.0])  # rank 2: Cholesky fails, eigh path runs
    var2 = np.array([9.0, 0.0, 1.0, 1.0])
    expected = np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    result = frechet_distance(np.zeros(4), np.diag(var1), np.zeros(4), np.diag(var2))
    assert result == pytest.approx(expected, rel=1e-12)


def test_frechet_with_fewer_samples_than_features_is_finite_and_continuous():
    rng = np.random.default_rng(6)
    few_a, few_b = rng.standard_normal((6, 40)), rng.standard_normal((9, 40)) + 0.5
    mu1, sigma1 = few_a.mean(0), np.cov(few_a, rowvar=False)  # rank 5 of 40
    mu2, sigma2 = few_b.mean(0), np.cov(few_b, rowvar=False)  # rank 8 of 40
    result = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert np.isfinite(result) and result > 0
    # The singular value is the limit of regularised ones (pytorch-fid's eps fallback).
    eps = 1e-10 * np.eye(40)
    regularised = sqrtm_frechet(mu1, sigma1 + eps, mu2, sigma2 + eps)
    assert result == pytest.approx(regularised, rel=1e-5)
    assert frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(result, rel=1e-8)


def test_cholesky_and_eigen_factors_give_the_same_trace():
    rng = np.random.default_rng(7)
    sigma1, sigma2 = random_spd(rng, 30), random_spd(rng, 30)
    cholesky = covariance_factor(sigma1)
    assert cholesky.lower_triangular
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    eigen = CovarianceFactor(eigenvectors * np.sqrt(eigenvalues), lower_triangular=False)
    expected = np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)).real
    assert trace_sqrt_product(cholesky, sigma2) == pytest.approx(expected, rel=1e-10)
    assert trace_sqrt_product(eigen, sigma2) == pytest.approx(expected, rel=1e-10)
    singular = np.diag([1.0, 0.0, 2.0])
    assert not covariance_factor(singular).lower_triangular


def test_frechet_accepts_torch_tensors_of_any_float_dtype():
    rng = np.random.default_rng(8)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    sigma1, sigma2 = random_spd(rng, 12), random_spd(rng, 12)
    expected = frechet_distance(mu1, sigma1, mu2, sigma2)
    as_tensors = [torch.from_numpy(a) for a in (mu1, sigma1, mu2, sigma2)]
    assert frechet_distance(*as_tensors) == pytest.approx(expected, rel=1e-14)
    as_float32 = [t.float() for t in as_tensors]
    assert frechet_distance(*as_float32) == pytest.approx(expected, rel=1e-4)


def test_frechet_reference_reuses_its_factor_and_agrees():
    rng = np.random.default_rng(9)
    mu1, sigma1 = rng.standard_normal(20), random_spd(rng, 20)
    reference = FrechetReference(mu1, sigma1)
    for _ in range(3):
        mu2, sigma2 = rng.standard_normal(20), random_spd(rng, 20)
        expected = sqrtm_frechet(mu1, sigma1, mu2, sigma2)
        assert reference.distance(mu2, sigma2) == pytest.approx(expected, rel=1e-8)


def test_frechet_accepts_rounding_asymmetry_in_covariances():
    rng = np.random.default_rng(10)
    sigma1, sigma2 = random_spd(rng, 16), random_spd(rng, 16)
    noisy = sigma2 + 1e-7 * np.triu(rng.standard_normal((16, 16)), 1)  # float32-like noise
    expected = frechet_distance(np.zeros(16), sigma1, np.zeros(16), sigma2)
    assert frechet_distance(np.zeros(16), sigma1, np.zeros(16), noisy) == pytest.approx(
        expected, rel=1e-12
    )


@pytest.mark.parametrize(
    "mu2, sigma2, message",
    [
        (np.zeros(3), np.eye(3), "features"),
        (np.zeros((4, 1)), np.eye(4), "shape"),
        (np.zeros(4), np.eye(3), "shape"),
        (np.full(4, np.nan), np.eye(4), "finite"),
        (np.zeros(4), np.triu(np.ones((4, 4))), "symmetric"),
        (np.zeros(4, dtype=complex), np.eye(4), "real"),
    ],
)
def test_frechet_rejects_malformed_statistics(mu2, sigma2, message):
    with pytest.raises(ValueError, match=message):
        frechet_distance(np.zeros(4), np.eye(4), mu2, sigma2)
