"""Frechet distance between two Gaussians, in float64, without a matrix square root.

    d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))

The eigenvalues of S1 S2 are those of the symmetric positive semi-definite matrix
A^T S2 A for any factor A with A A^T = S1 (A = sqrt(S1) gives sqrt(S1) S2 sqrt(S1)), so
Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of A^T S2 A. That
needs one factorisation and one symmetric eigenvalue solve instead of the
non-symmetric Schur decomposition behind scipy.linalg.sqrtm (pytorch-fid's way), is
exact up to rounding, and never produces an imaginary part.

The factor A is the Cholesky factor L when S1 is positive definite; then L^T S2 L comes
from LAPACK's sygst, which uses the symmetry and the triangle (half the work of two
matrix products). Otherwise A = V sqrt(max(w, 0)) from the eigendecomposition
S1 = V diag(w) V^T, which handles singular covariances (fewer samples than features)
without NaN. numpy/scipy LAPACK is the backend: torch.linalg in float64 was several
times slower here. benchmarks/frechet.py measures both against sqrtm.

Example:
    >>> import numpy as np
    >>> frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2))
    4.0
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from scipy.linalg import lapack

# Relative asymmetry a covariance may carry from float32 rounding before it is refused.
SYMMETRY_RTOL = 1e-4


def as_float64(array: Any, name: str) -> np.ndarray:
    """A numpy float64 copy-or-view of a numpy array, torch tensor or nested list."""
    if hasattr(array, "detach"):  # torch.Tensor, on any device
        array = array.detach().to("cpu").double().numpy()
    array = np.asarray(array)
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    return array.astype(np.float64, copy=False)


def check_stats(mu: Any, sigma: Any, name: str = "stats") -> tuple[np.ndarray, np.ndarray]:
    """Validate a (mean, covariance) pair and return it as float64 numpy arrays.

    Raises ValueError when mu is not 1-D, sigma is not square with the same dimension,
    either holds NaN or infinity, or sigma is not symmetric (up to SYMMETRY_RTOL of its
    largest entry). The computations below read only sigma's lower triangle, as LAPACK
    does, so rounding asymmetry is harmless.
    """
    mu = as_float64(mu, f"{name} mu")
    sigma = as_float64(sigma, f"{name} sigma")
    if mu.ndim != 1 or mu.shape[0] == 0:
        raise ValueError(f"{name} mu must have shape (F,), got {mu.shape}")
    features = mu.shape[0]
    if sigma.shape != (features, features):
        raise ValueError(
            f"{name} sigma must have shape ({features}, {features}) to match mu, got {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name} mu and sigma must be finite")
    if _largest_asymmetry(sigma) > SYMMETRY_RTOL * float(np.abs(sigma).max()):
        raise ValueError(f"{name} sigma must be symmetric")
    return mu, sigma


def _largest_asymmetry(sigma: np.ndarray, tile: int = 128) -> float:
    """max |sigma - sigma^T|, tile by tile: a whole transposed pass is 3x slower at 2048."""
    largest = 0.0
    for row in range(0, sigma.shape[0], tile):
        for column in range(0, row + 1, tile):  # tiles on and below the diagonal
            below = sigma[row : row + tile, column : column + tile]
            above = sigma[column : column + tile, row : row + tile]
            largest = max(largest, float(np.abs(below - above.T).max()))
    return largest


def _symmetric_from_lower(sigma: np.ndarray) -> np.ndarray:
    return np.tril(sigma) + np.tril(sigma, -1).T


class CovarianceFactor(NamedTuple):
    """A with A A^T = S; lower_triangular when A is S's Cholesky factor."""

    matrix: np.ndarray  # (F, F) float64
    lower_triangular: bool


def covariance_factor(sigma: np.ndarray) -> CovarianceFactor:
    """A factor of a symmetric positive semi-definite float64 sigma (F, F), from its
    lower triangle.

    Cholesky when sigma is numerically positive definite, otherwise the eigenvector
    factor with negative eigenvalues (rounding noise of a singular matrix) set to 0.
    """
    try:
        return CovarianceFactor(np.linalg.cholesky(sigma), lower_triangular=True)
    except np.linalg.LinAlgError:
        eigenvalues, eigenvectors = np.linalg.eigh(sigma)
        factor = eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))
        return CovarianceFactor(factor, lower_triangular=False)


def trace_sqrt_product(factor: CovarianceFactor, sigma: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) given a factor of S1 and S2 = sigma (float64; lower triangle read)."""
    if factor.lower_triangular:
        # sygst itype=3 writes L^T S2 L into the lower triangle, all that dsyevd reads.
        inner, info = lapack.dsygst(sigma, factor.matrix, itype=3, lower=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"LAPACK dsygst failed with info={info}")
    else:
        inner = factor.matrix.T @ _symmetric_from_lower(sigma) @ factor.matrix  # A^T S2 A
    eigenvalues = symmetric_eigenvalues(inner)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def symmetric_eigenvalues(matrix: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric float64 matrix from its lower triangle (overwritten).

    LAPACK dsyevd with its optimal workspace: about 15% faster than numpy.linalg.eigvalsh
    (the same routine) at 2048 dimensions here.
    """
    work, iwork, info = lapack.dsyevd_lwork(matrix.shape[0], compute_v=0, lower=1)
    if info == 0:
        eigenvalues, _, info = lapack.dsyevd(
            matrix, compute_v=0, lower=1, lwork=int(work), liwork=int(iwork), overwrite_a=1
        )
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK dsyevd failed with info={info}")
    return eigenvalues


def _combine(mean_term: float, trace1: float, trace2: float, cross: float) -> float:
    # The true distance is >= 0; a tiny negative value is rounding between equal inputs.
    return max(mean_term + trace1 + trace2 - 2.0 * cross, 0.0)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    This is the FID when the statistics are Inception features (pytorch-fid's
    calculate_frechet_distance, computed without sqrtm). Inputs may be numpy arrays or
    torch tensors (any device, any float dtype): mu of shape (F,), sigma of (F, F),
    symmetric positive semi-definite; singular covariances are fine. Raises ValueError
    on mismatched shapes or non-finite values. Never negative.
    """
    return FrechetReference(mu1, sigma1).distance(mu2, sigma2)


class FrechetReference:
    """Fixed reference statistics whose covariance factor is computed once.

    A running FID against one reference (the service streams samples and reports FID
    as they arrive) then costs one L^T S L product and one symmetric eigenvalue solve
    per evaluation, instead of also validating and factoring the reference every time.

    Example:
        >>> import numpy as np
        >>> reference = FrechetReference(np.zeros(3), np.eye(3))
        >>> reference.distance(np.zeros(3), np.eye(3))
        0.0
    """

    def __init__(self, mu: Any, sigma: Any) -> None:
        self.mu, self.sigma = check_stats(mu, sigma, "reference")
        self.factor = covariance_factor(self.sigma)
        self.trace = float(np.trace(self.sigma))

    @property
    def feature_dim(self) -> int:
        return self.mu.shape[0]

    def distance(self, mu: Any, sigma: Any) -> float:
        """Squared Frechet distance from N(mu, sigma) to this reference."""
        mu, sigma = check_stats(mu, sigma)
        if mu.shape != self.mu.shape:
            raise ValueError(
                f"statistics have {mu.shape[0]} features, the reference has {self.feature_dim}"
            )
        difference = mu - self.mu
        cross = trace_sqrt_product(self.factor, sigma)
        return _combine(float(difference @ difference), self.trace, float(np.trace(sigma)), cross)
