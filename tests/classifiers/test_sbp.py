"""SBP statistics against Monte Carlo, at the extremes, and the layer's behaviour."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from classifiers import sbp

A, B = sbp.LOG_THETA_MIN, sbp.LOG_THETA_MAX
MUS = [-25.0, -20.0, -10.0, -3.0, -1.0, 0.0, 1.0, 2.0, 5.0]
LOG_SIGMAS = [-20.0, -5.0, -2.0, -1.0, 0.0, 1.0, 2.0, 5.0]
# sigma = e^-20 with mu outside [a, b]: log theta sits within e^-40 of a bound, which no
# sampler resolves; those points are checked against their limits instead
PINNED = {(mu, -20.0) for mu in (-25.0, 1.0, 2.0, 5.0)}
GRID = [(mu, ls) for mu in MUS for ls in LOG_SIGMAS if (mu, ls) not in PINNED]


def monte_carlo(mu: float, log_sigma: float, n: int = 20_000, seed: int = 0):
    """KL, E[theta], SNR from stratified draws, importance-weighted against a mixture of
    q itself (scipy.stats.truncnorm inverse CDF) and Uniform[a, b], so both sharp q and
    heavy-tailed theta (mu near a, sigma ~ 1) are estimated to better than 1e-3."""
    rng = np.random.default_rng(seed)
    sigma = math.exp(log_sigma)
    alpha, beta = (A - mu) / sigma, (B - mu) / sigma

    def strata():
        return (np.arange(n) + rng.random(n)) / n

    x = np.concatenate(
        [mu + sigma * stats.truncnorm.ppf(strata(), alpha, beta), A + (B - A) * strata()]
    )
    log_q = stats.truncnorm.logpdf((x - mu) / sigma, alpha, beta) - log_sigma
    weights = np.exp(log_q) / (0.5 * np.exp(log_q) + 0.5 / (B - A))
    weights /= weights.sum()
    mean = np.sum(weights * np.exp(x))
    variance = np.sum(weights * np.expm1(x - math.log(mean)) ** 2) * mean**2
    kl = math.log(B - A) + np.sum(weights * log_q)
    return kl, mean, mean / math.sqrt(variance)


def stats_at(mu: float, log_sigma: float) -> sbp.TruncatedLogNormalStats:
    return sbp.truncated_log_normal_stats(torch.tensor(mu), torch.tensor(log_sigma))


def test_kl_mean_and_snr_match_monte_carlo_to_three_digits_over_the_grid():
    mus = torch.tensor([mu for mu, _ in GRID])
    log_sigmas = torch.tensor([ls for _, ls in GRID])
    analytic = sbp.truncated_log_normal_stats(mus, log_sigmas)
    for i, (mu, ls) in enumerate(GRID):
        kl, mean, snr = monte_carlo(mu, ls)
        point = f"mu={mu}, log sigma={ls}"
        assert analytic.kl[i].item() == pytest.approx(kl, rel=1e-3, abs=1e-3), point
        assert analytic.mean[i].item() == pytest.approx(mean, rel=1e-3), point
        assert analytic.snr[i].item() == pytest.approx(snr, rel=1e-3), point


@pytest.mark.parametrize("mu", [-25.0, 1.0, 2.0, 5.0])
def test_pinned_units_reach_their_limits(mu):
    # sigma -> 0 with mu outside [a, b]: log theta is the bound minus an exponential of
    # scale sigma^2 / distance, so KL -> log(b - a) - 1 - log(sigma^2 / distance)
    log_sigma = -20.0
    bound, distance = (A, A - mu) if mu < A else (B, mu - B)
    result = stats_at(mu, log_sigma)
    scale = math.exp(2 * log_sigma) / distance
    assert result.mean.item() == pytest.approx(math.exp(bound), rel=1e-9)
    assert result.kl.item() == pytest.approx(math.log(B - A) - 1 - math.log(scale), rel=1e-9)
    assert result.snr.item() == pytest.approx(1 / scale, rel=1e-6)


def test_statistics_are_finite_with_finite_gradients_over_the_whole_clamped_range():
    mu, log_sigma = torch.meshgrid(
        torch.linspace(-25, 5, 61, dtype=torch.float64),
        torch.linspace(-20, 5, 51, dtype=torch.float64),
        indexing="ij",
    )
    mu.requires_grad_(True)
    log_sigma.requires_grad_(True)
    result = sbp.truncated_log_normal_stats(mu, log_sigma)
    for value in result:
        assert torch.isfinite(value).all()
    (result.kl.sum() + result.mean.sum() + result.snr.log().sum()).backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(log_sigma.grad).all()
    assert (result.kl > -1e-12).all() and (result.mean <= 1).all() and (result.mean > 0).all()


def test_limits_match_intuition_for_wide_noise():
    # sigma = e^5: q is nearly the prior, KL ~ 0, theta nearly log-uniform, SNR ~ 1/3 < 1
    for mu in (-25.0, 0.0, 5.0):
        result = stats_at(mu, 5.0)
        assert result.kl.item() < 1e-4
        assert result.snr.item() == pytest.approx(0.333, abs=0.002)
    # tiny noise inside the interval: theta = e^mu exactly, huge SNR
    result = stats_at(-3.0, -20.0)
    assert result.mean.item() == pytest.approx(math.exp(-3.0), rel=1e-9)
    assert result.snr.item() == pytest.approx(math.exp(20.0), rel=1e-6)


@pytest.mark.parametrize(
    "mu, log_sigma", [(0.0, -5.0), (-1.0, 0.0), (-3.0, 1.0), (5.0, 0.0), (-25.0, 0.0)]
)
def test_samples_follow_the_truncated_normal(mu, log_sigma):
    generator = torch.Generator().manual_seed(1)
    draws = sbp.sample_log_theta(torch.tensor(mu), torch.tensor(log_sigma), (4000,), generator)
    sigma = math.exp(log_sigma)
    law = stats.truncnorm((A - mu) / sigma, (B - mu) / sigma, loc=mu, scale=sigma)
    assert stats.kstest(draws.numpy(), law.cdf).pvalue > 1e-3
    assert draws.min() >= A and draws.max() <= B


def test_samples_of_pinned_units_sit_at_the_right_bound():
    generator = torch.Generator().manual_seed(0)
    mu = torch.tensor([5.0, -25.0])
    draws = sbp.sample_log_theta(mu, torch.tensor([-20.0, -20.0]), (100,), generator)
    assert torch.equal(draws[:, 0], torch.zeros(100, dtype=torch.float64))
    assert torch.equal(draws[:, 1], torch.full((100,), A, dtype=torch.float64))


def test_sample_gradient_matches_finite_difference_of_the_mean():
    def mean_draw(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(3)  # common random numbers
        return sbp.sample_log_theta(mu, log_sigma, (20000,), generator).exp().mean()

    for mu0, ls0 in [(-1.0, 0.0), (-0.5, -1.0), (-19.0, 0.5)]:
        mu = torch.tensor(mu0, dtype=torch.float64, requires_grad=True)
        log_sigma = torch.tensor(ls0, dtype=torch.float64, requires_grad=True)
        mean_draw(mu, log_sigma).backward()
        h = 1e-5
        for param, grad in ((0, mu.grad), (1, log_sigma.grad)):
            plus = [torch.tensor(mu0, dtype=torch.float64), torch.tensor(ls0, dtype=torch.float64)]
            minus = [torch.tensor(mu0, dtype=torch.float64), torch.tensor(ls0, dtype=torch.float64)]
            plus[param] = plus[param] + h
            minus[param] = minus[param] - h
            numeric = (mean_draw(*plus) - mean_draw(*minus)) / (2 * h)
            assert grad.item() == pytest.approx(numeric.item(), rel=1e-3, abs=1e-12)


def test_keep_mask_never_removes_every_unit():
    assert sbp.keep_mask(torch.tensor([0.2, 0.9, 0.5])).tolist() == [False, True, False]
    assert sbp.keep_mask(torch.tensor([0.2, 1.5, 3.0])).tolist() == [False, True, True]


def test_layer_is_stochastic_in_training_and_masked_mean_in_eval():
    torch.manual_seed(0)
    layer = sbp.SBPLayer(4)
    with torch.no_grad():
        layer.mu.copy_(torch.tensor([0.0, -1.0, 0.0, -3.0]))
        layer.log_sigma.copy_(torch.tensor([-5.0, 0.0, 3.0, 4.0]))  # last two: SNR < 1
    x = torch.ones(2, 4, 3, 3)
    layer.train()
    noisy = layer(x)
    assert not torch.equal(noisy[0], noisy[1])  # one draw per example and unit
    assert torch.equal(noisy[0, :, 0, 0], noisy[0, :, 2, 1])  # shared over positions
    layer.eval()
    stats_ = layer.stats()
    expected = (stats_.mean * torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)).float()
    assert torch.allclose(layer(x)[0, :, 1, 1], expected)
    assert layer.mask().tolist() == [True, True, False, False]
    with torch.no_grad():  # the cached eval multiplier follows in-place updates
        layer.mu[0] = -2.0
    assert layer(x)[0, 0, 1, 1].item() == pytest.approx(math.exp(-2.0), rel=1e-3)


def test_all_pruned_layer_keeps_its_highest_snr_unit():
    layer = sbp.SBPLayer(3).eval()
    with torch.no_grad():
        layer.log_sigma.fill_(5.0)
        layer.mu.copy_(torch.tensor([-5.0, 0.0, -10.0]))
    mask = layer.mask()
    assert mask.sum() == 1 and mask[layer.stats().snr.argmax()]
    assert (layer(torch.ones(1, 3)) != 0).sum() == 1


def test_parameters_are_clamped_and_layer_rejects_wrong_width():
    layer = sbp.SBPLayer(2)
    with torch.no_grad():
        layer.mu.fill_(30.0)
        layer.log_sigma.fill_(-40.0)
    mu, log_sigma = layer.clamped()
    assert mu.max() == sbp.PARAM_MAX and log_sigma.min() == sbp.PARAM_MIN
    layer.project_()
    assert layer.mu.max() == sbp.PARAM_MAX
    with pytest.raises(ValueError):
        layer(torch.ones(1, 3))
    with pytest.raises(ValueError):
        sbp.SBPLayer(0)
