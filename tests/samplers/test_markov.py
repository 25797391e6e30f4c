import math

import torch

from samplers import Noise, markov, proposals, run_final
from samplers._core import accept
from tests.samplers import targets

ROWS, STEPS = 4000, 150
RHO = 0.6  # AR(1) proposal: x = RHO * y + sqrt(1 - RHO^2) * S * xi (not symmetric)
S = 2.0


def _log_q(x, y):
    """log q(x | y) for the AR(1) proposal, shape (B,)."""
    x, y = x[:, 0].double(), y[:, 0].double()
    sd = S * math.sqrt(1 - RHO**2)
    return -0.5 * ((x - RHO * y) / sd) ** 2


def exact_log_pair_symmetric(x, y):
    """d(x, y) = min(1, p(x) / p(y)): d(x, y) / d(y, x) = p(x) / p(y) exactly."""
    return (targets.log_p(x) - targets.log_p(y)).clamp(max=0.0).float()


def exact_log_pair_ar1(x, y):
    log_ratio = targets.log_p(x) + _log_q(y, x) - targets.log_p(y) - _log_q(x, y)
    return log_ratio.clamp(max=0.0).float()


def ar1_model(y, xi):
    return RHO * y + math.sqrt(1 - RHO**2) * S * xi


def _run(propose, log_pair, init="generator", scale=1.2, seed=0):
    noise = Noise.seeded(seed, ROWS)
    start = proposals.independent(targets.generator, 1)
    if init == "real":
        state = markov.init_real(torch.full((ROWS, 1), 1.5), scale)
    else:
        state = markov.init_generator(start, noise, scale)
    return run_final(markov.build(propose, log_pair), state, noise, STEPS)


def test_markov_gaussian_perturbation_matches_target():
    result = _run(proposals.gaussian_perturbation, exact_log_pair_symmetric)
    assert targets.ks_pvalue(result.samples) > targets.PASS_P


def test_markov_learned_conditional_proposal_matches_target():
    propose = proposals.conditional(ar1_model, noise_dim=1)
    result = _run(propose, exact_log_pair_ar1, init="real")
    assert targets.ks_pvalue(result.samples) > targets.PASS_P
    assert not (result.samples == 1.5).any()


def test_markov_that_ignores_proposal_asymmetry_fails():
    propose = proposals.conditional(ar1_model, noise_dim=1)
    result = _run(propose, exact_log_pair_symmetric)
    assert targets.ks_pvalue(result.samples) < targets.FAIL_P


def test_markov_flipped_ratio_fails(monkeypatch):
    monkeypatch.setattr(markov, "accept", lambda log_ratio, noise: accept(-log_ratio, noise))
    result = _run(proposals.gaussian_perturbation, exact_log_pair_symmetric)
    assert targets.ks_pvalue(result.samples) < targets.FAIL_P


def test_independent_pair_reduces_to_imh_ratio():
    log_pair = markov.independent_pair(targets.log_ratio)
    x, y = torch.randn(64, 1), torch.randn(64, 1)
    ratio = log_pair(x, y) - log_pair(y, x)
    torch.testing.assert_close(ratio, targets.log_ratio(x) - targets.log_ratio(y))
