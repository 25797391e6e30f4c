"""Feature statistics: a streaming mean/covariance accumulator and pytorch-fid .npz files.

FeatureStats keeps (count, mean, centered sum of outer products) in float64 and merges
batches with Chan et al.'s parallel update, which stays accurate when the mean is large
compared with the spread (a raw sum of outer products would cancel catastrophically).
Any split of the same rows into batches, in any order, gives the statistics of the
whole set: workers can accumulate shards and merge them.

Example:
    >>> import numpy as np
    >>> stats = FeatureStats(2)
    >>> stats.update(np.array([[0.0, 1.0], [2.0, 3.0]])).count
    2
    >>> stats.mean
    array([1., 2.])
"""

from __future__ import annotations

import os
import zipfile
from typing import IO, Any

import numpy as np

from evaluation.frechet import FrechetReference, as_float64, check_stats, frechet_distance

STATS_KEYS = ("mu", "sigma")  # what pytorch-fid's save_fid_stats writes and reads


class FeatureStats:
    """Running count, mean and covariance of feature rows (N, F), in float64.

    update(features) adds a batch, merge(other) adds another accumulator; both change
    this object and return it. covariance is unbiased (ddof=1), as numpy.cov and
    pytorch-fid compute it.
    """

    def __init__(self, feature_dim: int) -> None:
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be positive, got {feature_dim}")
        self.feature_dim = int(feature_dim)
        self.count = 0
        self._mean = np.zeros(feature_dim)
        self._scatter = np.zeros((feature_dim, feature_dim))  # sum of (x - mean)(x - mean)^T

    @classmethod
    def from_features(cls, features: Any) -> FeatureStats:
        """Statistics of one (N, F) array or tensor."""
        features = _as_rows(features, None)
        return cls(features.shape[1]).update(features)

    def update(self, features: Any) -> FeatureStats:
        """Add a batch of rows: (N, F) numpy array or torch tensor (any device)."""
        features = _as_rows(features, self.feature_dim)
        count = features.shape[0]
        if count == 0:
            return self
        mean = features.mean(axis=0)
        centered = features - mean
        return self._merge_moments(count, mean, centered.T @ centered)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add the rows another accumulator has seen (other is left unchanged)."""
        if other.feature_dim != self.feature_dim:
            raise ValueError(
                f"cannot merge {other.feature_dim}-feature stats into {self.feature_dim}"
            )
        if other.count == 0:
            return self
        return self._merge_moments(other.count, other._mean, other._scatter)

    def _merge_moments(self, count: int, mean: np.ndarray, scatter: np.ndarray) -> FeatureStats:
        total = self.count + count
        delta = mean - self._mean
        # Chan et al. (1979): the between-group term restores what centering removed.
        self._scatter = (
            self._scatter + scatter + np.outer(delta, delta) * (self.count * count / total)
        )
        self._mean = self._mean + delta * (count / total)
        self.count = total
        return self

    @property
    def mean(self) -> np.ndarray:
        """Mean feature vector (F,); raises ValueError before any row was added."""
        if self.count == 0:
            raise ValueError("no features accumulated yet")
        return self._mean.copy()

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased covariance (F, F); needs at least 2 rows."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 rows, have {self.count}")
        return self._scatter / (self.count - 1)

    def fid_to(self, reference: FeatureStats | FrechetReference | tuple[Any, Any]) -> float:
        """Frechet distance from these statistics to a reference.

        reference: another FeatureStats, a FrechetReference (fastest when called
        repeatedly against the same reference), or a (mu, sigma) pair as load_stats
        returns.
        """
        if isinstance(reference, FrechetReference):
            return reference.distance(self.mean, self.covariance)
        if isinstance(reference, FeatureStats):
            return frechet_distance(
                reference.mean, reference.covariance, self.mean, self.covariance
            )
        mu, sigma = reference
        return frechet_distance(mu, sigma, self.mean, self.covariance)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Exact accumulator state as plain arrays (for safetensors/npz between workers)."""
        return {
            "count": np.array(self.count, dtype=np.int64),
            "mean": self._mean.copy(),
            "scatter": self._scatter.copy(),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> FeatureStats:
        """Inverse of to_arrays; raises ValueError on a malformed state."""
        try:
            count = int(np.asarray(arrays["count"]))
            mean = as_float64(arrays["mean"], "mean")
            scatter = as_float64(arrays["scatter"], "scatter")
        except KeyError as error:
            raise ValueError(f"feature stats state is missing {error}") from None
        if count < 0 or mean.ndim != 1 or scatter.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError("feature stats state has inconsistent count or shapes")
        stats = cls(mean.shape[0])
        stats.count, stats._mean, stats._scatter = count, mean.copy(), scatter.copy()
        return stats

    def __repr__(self) -> str:
        return f"FeatureStats(feature_dim={self.feature_dim}, count={self.count})"


def _as_rows(features: Any, feature_dim: int | None) -> np.ndarray:
    features = as_float64(features, "features")
    if features.ndim != 2:
        raise ValueError(f"features must have shape (N, F), got {features.shape}")
    if feature_dim is not None and features.shape[1] != feature_dim:
        raise ValueError(f"features have {features.shape[1]} columns, expected {feature_dim}")
    if not np.isfinite(features).all():
        raise ValueError("features must be finite")
    return features


def save_stats(path: str | os.PathLike[str] | IO[bytes], mu: Any, sigma: Any) -> None:
    """Write (mu, sigma) as a pytorch-fid .npz file (keys "mu" and "sigma", float64).

    The file is written at exactly `path` (numpy would append ".npz" to a bare name).
    """
    mu, sigma = check_stats(mu, sigma)
    if isinstance(path, (str, os.PathLike)):
        with open(path, "wb") as file:
            np.savez_compressed(file, mu=mu, sigma=sigma)
    else:
        np.savez_compressed(path, mu=mu, sigma=sigma)


def load_stats(path: str | os.PathLike[str] | IO[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Read (mu, sigma) from a pytorch-fid .npz file, as float64 arrays.

    Files come from users: nothing is unpickled (object arrays are refused), and a file
    that is not an .npz archive, lacks "mu" or "sigma", or holds statistics of the wrong
    shape raises ValueError naming the problem (a missing file raises
    FileNotFoundError). Extra keys are ignored, as pytorch-fid does.
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"not a readable .npz statistics file: {error}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError("statistics must be an .npz archive with arrays 'mu' and 'sigma'")
    with archive:
        missing = [key for key in STATS_KEYS if key not in archive.files]
        if missing:
            raise ValueError(
                f"statistics file lacks {missing}; it has {sorted(archive.files)} "
                "(expected pytorch-fid's 'mu' and 'sigma')"
            )
        try:
            mu, sigma = archive["mu"], archive["sigma"]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"cannot read statistics arrays: {error}") from None
    return check_stats(mu, sigma, "loaded")
