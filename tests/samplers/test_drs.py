import math

import pytest
import torch

from samplers import Noise, drs, proposals, put, run_final, run_stream, take
from samplers._core import noise_rows
from tests.samplers import targets

ROWS = 4000


def _setup(seed=0):
    propose = proposals.independent(targets.generator, 1)
    noise = Noise.seeded(seed, ROWS)
    pilot = drs.pilot(propose, targets.log_ratio, noise)
    return propose, noise, pilot


def _accepted_samples(gamma: float, steps: int = 30):
    propose, noise, pilot = _setup()
    state = drs.init(torch.zeros(ROWS, 1), pilot.max(), gamma=gamma)
    batches = run_stream(drs.build(propose, targets.log_ratio), state, noise, steps)
    return torch.cat([samples for samples, _ in batches])


def test_drs_with_zero_gamma_is_exact_rejection_sampling():
    samples = _accepted_samples(gamma=0.0)
    assert len(samples) > 10_000
    assert targets.ks_pvalue(samples) > targets.PASS_P


def test_drs_acceptance_matches_one_over_bound():
    # Exact rejection sampling accepts with probability 1 / M, M = max p / p_G.
    propose, noise, pilot = _setup()
    state = drs.init(torch.zeros(ROWS, 1), pilot.max())
    infos = [
        info for _, info in run_stream(drs.build(propose, targets.log_ratio), state, noise, 20)
    ]
    rate = torch.cat([i.is_accepted for i in infos]).float().mean().item()
    assert rate == pytest.approx(math.exp(-pilot.max().item()), rel=0.03)


def test_positive_gamma_trades_exactness_for_acceptance():
    _, _, pilot = _setup()
    gamma = drs.gamma_for_percentile(pilot, 50.0)
    assert gamma < 0  # a median shift lowers the bar here
    samples = _accepted_samples(gamma=gamma)
    assert len(samples) > 1.5 * len(_accepted_samples(gamma=0.0))
    assert targets.ks_pvalue(samples) < targets.FAIL_P


def test_drs_running_maximum_only_grows():
    propose, noise, _ = _setup()
    state = drs.init(torch.zeros(ROWS, 1), log_max=-5.0)  # a pilot that saw too little
    state, _ = drs.build(propose, targets.log_ratio).step(state, noise)
    assert (state.log_max >= -5.0).all() and (state.log_max > -5.0).any()


def test_drs_final_returns_an_accepted_sample_per_row():
    propose, noise, pilot = _setup()
    state = drs.init(torch.zeros(ROWS, 1), pilot.max())
    result = run_final(drs.build(propose, targets.log_ratio), state, noise, 1)
    assert result.fallback == 0 and result.accepted == ROWS  # one acceptance per row
    assert targets.ks_pvalue(result.samples) > targets.PASS_P
    # Each row proposes until it accepts: about M = exp(l_max) proposals per sample.
    assert result.proposals / ROWS == pytest.approx(math.exp(pilot.max().item()), rel=0.05)


def test_drs_rows_that_spend_their_budget_are_counted_not_passed_off():
    propose, noise, pilot = _setup()
    state = drs.init(torch.zeros(ROWS, 1), pilot.max(), budget=2)
    kernel = drs.build(propose, targets.log_ratio)
    result = run_final(kernel, state, noise, 1)
    assert result.proposals <= 2 * ROWS
    assert 0 < result.fallback < ROWS
    # The fallback rows hold raw proposals (p_G), which fail the test the others pass.
    assert targets.ks_pvalue(result.samples) < targets.FAIL_P


def test_drs_done_rows_stop_proposing():
    propose, noise, pilot = _setup()
    kernel = drs.build(propose, targets.log_ratio)
    state = drs.init(torch.zeros(ROWS, 1), pilot.max(), budget=50)
    result = run_final(kernel, state, noise, 1)
    _, noise, _ = _setup()  # the same streams again, by hand
    while (active := ~kernel.done(state)).any():
        part, _ = kernel.step(take(state, active), noise_rows(noise, active))
        state = put(state, active, part)
    assert kernel.done(state).all()
    assert int(state.trials.sum()) == result.proposals
    assert (state.trials[state.has_sample] <= 50).all()
    assert (state.trials[~state.has_sample] == 50).all()
    assert int((~state.has_sample).sum()) == result.fallback


def test_log1mexp_is_finite_near_zero():
    a = torch.tensor([-1e-12, -1e-6, -0.5, -30.0])
    out = drs.log1mexp(a)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[2], torch.log(1 - torch.exp(a[2])))
