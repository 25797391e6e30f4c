import io

import numpy as np
import pytest
import torch

from evaluation.frechet import FrechetReference, frechet_distance
from evaluation.stats import FeatureStats, load_stats, save_stats

UNPICKLED = []


def _record_unpickling():
    UNPICKLED.append(True)
    return "payload"


class Payload:
    """Unpickling this object would run code: load_stats must never do it."""

    def __reduce__(self):
        return (_record_unpickling, ())


@pytest.fixture
def features() -> np.ndarray:
    rng = np.random.default_rng(0)
    # A large offset against a small spread: raw sums of outer products would lose
    # about 6 digits here, Chan's centered merges do not.
    return 1e3 + rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6))


def assert_matches_numpy(stats: FeatureStats, features: np.ndarray) -> None:
    assert stats.count == len(features)
    np.testing.assert_allclose(stats.mean, features.mean(axis=0), rtol=1e-10, atol=0)
    expected = np.cov(features, rowvar=False)
    np.testing.assert_allclose(
        stats.covariance, expected, rtol=0, atol=1e-10 * np.abs(expected).max()
    )


def test_one_shot_update_matches_numpy_mean_and_cov(features):
    assert_matches_numpy(FeatureStats.from_features(features), features)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_updates_in_any_split_match_one_shot_statistics(features, seed):
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, len(features), size=8))  # empty and size-1 batches too
    stats = FeatureStats(features.shape[1])
    for batch in np.split(features, cuts):
        stats.update(batch)
    assert_matches_numpy(stats, features)


def test_merging_shards_in_any_order_matches_one_shot_statistics(features):
    shards = [FeatureStats.from_features(part) for part in np.array_split(features, 7)]
    left_to_right = FeatureStats(features.shape[1])
    for shard in shards:
        left_to_right.merge(shard)
    assert_matches_numpy(left_to_right, features)

    # Pairwise tree, right to left: another association of the same rows.
    level = shards[::-1]
    while len(level) > 1:
        level = [
            level[i].merge(level[i + 1]) if i + 1 < len(level) else level[i]
            for i in range(0, len(level), 2)
        ]
    assert_matches_numpy(level[0], features)


def test_merge_leaves_the_other_accumulator_unchanged(features):
    first, second = (
        FeatureStats.from_features(features[:100]),
        FeatureStats.from_features(features[100:]),
    )
    before = second.to_arrays()
    first.merge(second)
    after = second.to_arrays()
    assert all(np.array_equal(before[key], after[key]) for key in before)


def test_update_accepts_torch_tensors(features):
    stats = FeatureStats(6).update(torch.from_numpy(features).float())
    np.testing.assert_allclose(stats.mean, features.astype(np.float32).mean(0), rtol=1e-6)


def test_state_round_trips_through_plain_arrays(features):
    stats = FeatureStats.from_features(features)
    restored = FeatureStats.from_arrays(stats.to_arrays()).update(features)
    assert_matches_numpy(restored, np.concatenate([features, features]))


def test_statistics_need_enough_rows():
    stats = FeatureStats(3)
    with pytest.raises(ValueError, match="no features"):
        _ = stats.mean
    stats.update(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        _ = stats.covariance
    with pytest.raises(ValueError, match="columns"):
        stats.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match="finite"):
        stats.update(np.full((2, 3), np.nan))


def test_fid_to_agrees_for_every_reference_form(features):
    rng = np.random.default_rng(1)
    other = rng.standard_normal((200, 6)) + 1e3
    stats, reference = FeatureStats.from_features(features), FeatureStats.from_features(other)
    mu, sigma = other.mean(0), np.cov(other, rowvar=False)
    expected = frechet_distance(mu, sigma, features.mean(0), np.cov(features, rowvar=False))
    assert expected > 1.0
    for form in (reference, (mu, sigma), FrechetReference(mu, sigma)):
        assert stats.fid_to(form) == pytest.approx(expected, rel=1e-8)


def test_saved_stats_round_trip_and_read_like_pytorch_fid(tmp_path, features):
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    path = tmp_path / "reference"  # no suffix: the file must land at exactly this path
    save_stats(path, mu, sigma)
    assert path.exists()
    loaded_mu, loaded_sigma = load_stats(path)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    with np.load(path) as archive:  # pytorch-fid's compute_statistics_of_path
        np.testing.assert_array_equal(archive["mu"][:], mu)
        np.testing.assert_array_equal(archive["sigma"][:], sigma)


def test_loads_stats_written_by_numpy_savez_with_extra_keys():
    buffer = io.BytesIO()
    np.savez(buffer, mu=np.zeros(3, np.float32), sigma=np.eye(3, dtype=np.float32), n=np.array(5))
    buffer.seek(0)
    mu, sigma = load_stats(buffer)
    assert mu.dtype == np.float64 and sigma.shape == (3, 3)


def write_npz(path, **arrays):
    with open(path, "wb") as file:
        np.savez(file, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"m": np.zeros(3), "s": np.eye(3)}, "lacks"),
        ({"mu": np.zeros(3)}, "sigma"),
        ({"mu": np.zeros(3), "sigma": np.eye(4)}, "shape"),
        ({"mu": np.zeros((3, 3)), "sigma": np.eye(3)}, "shape"),
        ({"mu": np.zeros(3), "sigma": np.full((3, 3), np.inf)}, "finite"),
        ({"mu": np.array(["a", "b"]), "sigma": np.eye(2)}, "real"),
    ],
)
def test_load_stats_rejects_malformed_files(tmp_path, arrays, message):
    with pytest.raises(ValueError, match=message):
        load_stats(write_npz(tmp_path / "bad.npz", **arrays))


def test_load_stats_refuses_pickled_arrays_without_unpickling(tmp_path):
    objects = np.array([Payload(), Payload()], dtype=object)
    path = write_npz(tmp_path / "pickled.npz", mu=objects, sigma=np.eye(2))
    with pytest.raises(ValueError, match="pickle"):
        load_stats(path)
    assert UNPICKLED == []


@pytest.mark.parametrize("content", [b"not an archive at all", b"PK\x03\x04 truncated", b""])
def test_load_stats_rejects_files_that_are_not_npz(tmp_path, content):
    path = tmp_path / "junk.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError):
        load_stats(path)


def test_load_stats_reports_a_missing_file_as_such(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_stats(tmp_path / "absent.npz")


def test_load_stats_rejects_a_single_npy_array(tmp_path):
    path = tmp_path / "mu.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(ValueError, match="npz"):
        load_stats(path)


def test_save_stats_validates_before_writing(tmp_path):
    path = tmp_path / "never.npz"
    with pytest.raises(ValueError):
        save_stats(path, np.zeros(3), np.eye(2))
    assert not path.exists()
