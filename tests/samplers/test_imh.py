import pytest
import torch

from samplers import Noise, _core, imh, proposals, run_final, run_stream
from tests.samplers import targets

ROWS, STEPS = 4000, 40


def _run(init: str, seed: int = 0):
    propose = proposals.independent(targets.generator, latent_dim=1)
    noise = Noise.seeded(seed, ROWS)
    if init == "real":
        x_real = torch.full((ROWS, 1), 1.5)  # a single 'real' point, never to be returned
        state = imh.init_real(x_real, targets.log_ratio)
    else:
        state = imh.init_generator(propose, targets.log_ratio, noise)
    return run_final(imh.build(propose, targets.log_ratio), state, noise, STEPS)


@pytest.mark.parametrize("init", ["generator", "real"])
def test_imh_matches_target_with_exact_ratio(init):
    result = _run(init)
    assert targets.ks_pvalue(result.samples) > targets.PASS_P
    assert 0.2 < result.acceptance_rate < 0.8


def test_imh_never_returns_the_real_starting_point():
    result = _run("real")
    assert not (result.samples == 1.5).any()


def test_imh_restarts_chains_that_never_moved():
    # A discriminator that scores the real start far above any proposal pins it there.
    def log_ratio(x):
        return torch.where(x[:, 0] == 7.0, torch.tensor(50.0), torch.tensor(0.0))

    propose = proposals.independent(targets.generator, 1)
    noise = Noise.seeded(0, 16)
    state = imh.init_real(torch.full((16, 1), 7.0), log_ratio)
    result = run_final(imh.build(propose, log_ratio), state, noise, 5)
    assert result.restarted == 16
    assert not (result.samples == 7.0).any()


@pytest.mark.parametrize(
    "broken",
    [
        lambda log_ratio, noise: _core.accept(-log_ratio, noise),  # flipped ratio
        lambda log_ratio, noise: _core.accept(torch.zeros_like(log_ratio), noise),  # always
        lambda log_ratio, noise: _core.accept(log_ratio / 2, noise),  # tempered
    ],
    ids=["flipped", "always-accept", "half-ratio"],
)
def test_broken_acceptance_rule_fails_the_same_test(monkeypatch, broken):
    monkeypatch.setattr(imh, "accept", broken)
    assert targets.ks_pvalue(_run("generator").samples) < targets.FAIL_P


def test_imh_same_seed_same_samples_whatever_the_batch_neighbours():
    propose = proposals.independent(targets.generator, 1)
    kernel = imh.build(propose, targets.log_ratio)

    def alone():
        noise = Noise([_core.make_generator(3)], [8])
        state = imh.init_generator(propose, targets.log_ratio, noise)
        return run_final(kernel, state, noise, 10).samples

    def shared():
        noise = Noise([_core.make_generator(9), _core.make_generator(3)], [5, 8])
        state = imh.init_generator(propose, targets.log_ratio, noise)
        return run_final(kernel, state, noise, 10).samples[5:]

    torch.testing.assert_close(alone(), shared())


def test_nan_log_ratio_rejects():
    noise = Noise.seeded(0, 4)
    info = _core.accept(torch.tensor([float("nan"), float("inf"), 0.0, -float("inf")]), noise)
    assert info.is_accepted.tolist() == [False, True, True, False]
    assert info.acceptance_probability.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_stream_emits_only_accepted_proposals():
    propose = proposals.independent(targets.generator, 1)
    noise = Noise.seeded(0, 256)
    state = imh.init_real(torch.full((256, 1), 1.5), targets.log_ratio)
    emitted = list(run_stream(imh.build(propose, targets.log_ratio), state, noise, 20, thin=2))
    assert len(emitted) == 10
    for samples, info in emitted:
        assert len(samples) == int(info.is_accepted.sum())
        assert not (samples == 1.5).any()
