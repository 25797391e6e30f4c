import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from evaluation.toy25 import TOY25_MEANS, TOY25_STD, jensen_shannon, toy25_metrics, toy25_sample


def test_perfect_samples_score_perfectly():
    samples = toy25_sample(20_000, torch.Generator().manual_seed(0))
    metrics = toy25_metrics(samples)
    # P(|noise| > 4 std) for a 2-D Gaussian is exp(-8) = 3.4e-4.
    assert metrics.high_quality_rate > 0.998
    assert metrics.modes_covered == 25
    assert metrics.within_mode_std == pytest.approx(TOY25_STD, abs=0.002)
    assert metrics.jsd_from_uniform < 2e-3  # multinomial noise only: about 1.5e-4
    assert metrics.count == 20_000 and sum(metrics.mode_counts) > 19_960


def test_too_wide_modes_show_in_std_and_quality():
    generator = torch.Generator().manual_seed(1)
    modes = torch.randint(0, 25, (20_000,), generator=generator)
    samples = torch.from_numpy(TOY25_MEANS)[modes] + 0.1 * torch.randn(
        20_000, 2, generator=generator
    )
    metrics = toy25_metrics(samples)
    assert metrics.high_quality_rate == pytest.approx(1 - math.exp(-2), abs=0.01)  # 2 of its std
    assert metrics.within_mode_std > 0.07


def test_samples_from_one_mode_cover_one_mode_with_large_divergence():
    generator = torch.Generator().manual_seed(2)
    samples = torch.tensor([1.0, -2.0]) + TOY25_STD * torch.randn(3000, 2, generator=generator)
    metrics = toy25_metrics(samples)
    assert metrics.modes_covered == 1
    assert metrics.high_quality_rate > 0.99
    # JSD of a point mass against uniform over 25, in nats.
    expected = 0.5 * math.log(1 / 0.52) + 0.5 * (0.04 * math.log(0.04 / 0.52) + 0.96 * math.log(2))
    assert metrics.jsd_from_uniform == pytest.approx(expected, rel=1e-9)
    assert metrics.jsd_from_uniform > 0.6


def test_uniform_noise_is_rarely_high_quality():
    rng = np.random.default_rng(3)
    metrics = toy25_metrics(rng.uniform(-3, 3, size=(20_000, 2)))
    # 25 discs of radius 0.2 in a 6 x 6 square: 25 pi 0.04 / 36 = 0.087.
    assert metrics.high_quality_rate == pytest.approx(25 * math.pi * 0.04 / 36, abs=0.01)
    assert metrics.modes_covered == 25
    # Uniform over each disc: per-coordinate std is 0.2 / 2.
    assert metrics.within_mode_std == pytest.approx(0.1, abs=0.005)


def test_mode_assignment_matches_brute_force_nearest_mean():
    rng = np.random.default_rng(4)
    points = rng.uniform(-2.6, 2.6, size=(20_000, 2))
    distances = np.linalg.norm(points[:, None] - TOY25_MEANS[None].astype(np.float64), axis=-1)
    high_quality = distances.min(axis=1) <= 0.2
    expected = np.bincount(distances.argmin(axis=1)[high_quality], minlength=25)
    assert toy25_metrics(points).mode_counts == tuple(expected)


def test_min_count_raises_the_bar_for_coverage():
    points = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    assert toy25_metrics(points).modes_covered == 2
    assert toy25_metrics(points, min_count=2).modes_covered == 1


def test_jensen_shannon_matches_scipy_in_nats():
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 50, 25).astype(float)
    assert jensen_shannon(counts, np.ones(25)) == pytest.approx(
        jensenshannon(counts, np.ones(25)) ** 2, rel=1e-9
    )


def test_non_finite_and_no_high_quality_samples_are_handled():
    points = np.array([[np.nan, 0.0], [np.inf, 1.0], [0.5, 0.5]])
    metrics = toy25_metrics(points)
    assert metrics.high_quality_rate == 0 and metrics.modes_covered == 0
    assert metrics.jsd_from_uniform == pytest.approx(math.log(2))
    assert math.isnan(metrics.within_mode_std)


@pytest.mark.parametrize("shape", [(10, 3), (10,), (0, 2)])
def test_rejects_samples_that_are_not_points_in_the_plane(shape):
    with pytest.raises(ValueError, match="N, 2"):
        toy25_metrics(np.zeros(shape))
