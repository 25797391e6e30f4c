"""isir, ex2mcmc and auto-step mala with their defaults, on a user-style generator.

G(z) = 2.5 z with the exact log p / p_G: the latent chains pushed through G sample p
exactly. Each exactness test runs the method as a request would (prepare with the
method's defaults and steps=STEPS, the service's default: warm-up is the first half),
and each has a broken variant that must fail the same test.
"""

import pytest
import torch

from samplers import Noise, _core, adaptation, ex2mcmc, isir, run_final, run_stream
from samplers.chain import emitted
from samplers.methods import Models, prepare
from tests.samplers.targets import FAIL_P, ONE_MODE, PASS_P, TWO_MODES

STEPS = 20  # the service's default steps per chain
ROWS = 20_000
EX2MCMC_ROWS = 100_000  # its broken variant (adapting on) is a subtle bias: it needs these


def _run(method, target, rows=ROWS, steps=STEPS, params=None, seed=0):
    models = Models(generator=target.generator, latent_dim=1, log_ratio=target.log_ratio)
    noise = Noise.seeded(seed, rows)
    kernel, state = prepare(method, models, params or {}, noise, steps=steps)
    return run_final(kernel, state, noise, steps)


def test_isir_matches_two_mode_target_with_defaults():
    result = _run("isir", TWO_MODES)
    assert TWO_MODES.ks_pvalue(result.samples) > PASS_P
    assert 0.5 < result.acceptance_rate < 0.95  # share of steps that moved


def test_isir_that_drops_the_current_particle_fails(monkeypatch):
    categorical = isir._categorical

    def without_current(log_weights, noise):
        return categorical(log_weights.index_fill(1, torch.tensor([0]), -torch.inf), noise)

    monkeypatch.setattr(isir, "_categorical", without_current)
    assert TWO_MODES.ks_pvalue(_run("isir", TWO_MODES).samples) < FAIL_P


def test_isir_that_forgets_the_proposal_density_fails(monkeypatch):
    monkeypatch.setattr(isir, "log_proposal", lambda z, scale: torch.zeros(z.shape[:-1]))
    assert TWO_MODES.ks_pvalue(_run("isir", TWO_MODES).samples) < FAIL_P


def test_ex2mcmc_matches_two_mode_target_with_defaults():
    result = _run("ex2mcmc", TWO_MODES, rows=EX2MCMC_ROWS)
    assert TWO_MODES.ks_pvalue(result.samples) > PASS_P


def test_ex2mcmc_that_keeps_adapting_after_warmup_fails(monkeypatch):
    monkeypatch.setattr(adaptation, "tick", lambda left: (torch.ones_like(left, dtype=bool), left))
    result = _run("ex2mcmc", TWO_MODES, rows=EX2MCMC_ROWS)
    assert TWO_MODES.ks_pvalue(result.samples) < FAIL_P


def test_mala_auto_step_matches_one_mode_target():
    result = _run("mala", ONE_MODE)
    assert ONE_MODE.ks_pvalue(result.samples) > PASS_P
    assert 0.4 < result.acceptance_rate < 0.9


def test_mala_with_a_tiny_fixed_step_fails_the_same_test():
    # No adaptation: the chains hardly leave their N(0, I) starts in STEPS steps.
    result = _run("mala", ONE_MODE, params={"step_size": 1e-4})
    assert ONE_MODE.ks_pvalue(result.samples) < FAIL_P


def _steps(method, params=None, rows=64, steps=STEPS, seed=0):
    models = Models(generator=TWO_MODES.generator, latent_dim=1, log_ratio=TWO_MODES.log_ratio)
    noise = Noise.seeded(seed, rows)
    kernel, state = prepare(method, models, params or {}, noise, steps=steps)
    infos = []
    for _ in range(steps):
        state, info = kernel.step(state, noise)
        infos.append(info)
    return state, infos


@pytest.mark.parametrize("method", ["mala", "ex2mcmc"])
def test_auto_step_warms_up_for_half_the_steps_then_freezes(method):
    state, infos = _steps(method)
    flags = [bool(info.in_warmup.all()) for info in infos]
    assert flags == [True] * (STEPS // 2) + [False] * (STEPS - STEPS // 2)
    assert not any(bool(info.in_warmup.any()) for info in infos[STEPS // 2 :])
    assert (state.step_size != adaptation.INITIAL_STEP_SIZE).all()  # it adapted


def test_step_size_does_not_change_after_warmup():
    models = Models(generator=TWO_MODES.generator, latent_dim=1, log_ratio=TWO_MODES.log_ratio)
    noise = Noise.seeded(0, 64)
    kernel, state = prepare("ex2mcmc", models, {"warmup": 3}, noise, steps=STEPS)
    for _ in range(3):
        state, _ = kernel.step(state, noise)
    frozen = state.step_size.clone()
    for _ in range(5):
        state, info = kernel.step(state, noise)
        assert not info.in_warmup.any()
    torch.testing.assert_close(state.step_size, frozen, rtol=0, atol=0)


def test_fixed_step_mala_has_no_warmup():
    _, infos = _steps("mala", {"step_size": 0.01})
    assert not any(bool(info.in_warmup.any()) for info in infos)


@pytest.mark.parametrize("method", ["pcn", "mala", "isir", "ex2mcmc"])
def test_latent_methods_trace_their_log_target(method):
    state, infos = _steps(method)
    z = state.z[:, 0]
    expected = -0.5 * z**2 + TWO_MODES.log_ratio(TWO_MODES.generator(state.z))
    torch.testing.assert_close(infos[-1].trace, expected, rtol=1e-4, atol=1e-4)


def test_stream_never_emits_warmup_steps():
    models = Models(generator=TWO_MODES.generator, latent_dim=1, log_ratio=TWO_MODES.log_ratio)
    noise = Noise.seeded(0, 128)
    kernel, state = prepare("mala", models, {}, noise, steps=STEPS)
    batches = list(run_stream(kernel, state, noise, STEPS))
    assert all(len(samples) == 0 for samples, _ in batches[: STEPS // 2])
    assert sum(len(samples) for samples, _ in batches[STEPS // 2 :]) > 0
    for samples, info in batches:
        assert len(samples) == int(emitted(info).sum())


def test_isir_evaluates_new_particles_in_one_batch_and_never_the_current_one():
    calls = []

    def log_ratio(x):
        calls.append(len(x))
        return TWO_MODES.log_ratio(x)

    models = Models(generator=TWO_MODES.generator, latent_dim=1, log_ratio=log_ratio)
    noise = Noise.seeded(0, 10)
    kernel, state = prepare("isir", models, {"particles": 5}, noise)
    calls.clear()
    kernel.step(state, noise)
    assert calls == [10 * 4]


def test_isir_move_probability_and_nan_particles():
    noise = Noise.seeded(0, 3)
    log_weights = torch.tensor(
        [
            [0.0, -torch.inf, -torch.inf],
            [-torch.inf, 0.0, 0.0],
            [-torch.inf, -torch.inf, -torch.inf],
        ]
    )
    pick, log_move = isir._categorical(log_weights, noise)
    assert pick.tolist()[0] == 0 and pick.tolist()[1] in (1, 2) and pick.tolist()[2] == 0
    assert log_move[0] == -torch.inf and log_move[1] == 0.0 and log_move[2].isnan()

    def nan_for_positive(x):
        return torch.where(x[:, 0] > 0, torch.tensor(float("nan")), TWO_MODES.log_ratio(x))

    models = Models(generator=TWO_MODES.generator, latent_dim=1, log_ratio=nan_for_positive)
    noise = Noise.seeded(0, 256)
    kernel, state = prepare("isir", models, {}, noise)
    for _ in range(5):
        state, _ = kernel.step(state, noise)
    moved_to = state.z[torch.isfinite(state.log_target)]
    assert (moved_to <= 0).all()


def test_isir_same_seed_same_samples_whatever_the_batch_neighbours():
    kernel = isir.build(TWO_MODES.generator, TWO_MODES.log_ratio)

    def run(noise, particles):
        state = isir.init(TWO_MODES.generator, TWO_MODES.log_ratio, noise, 1, particles)
        for _ in range(5):
            state, _ = kernel.step(state, noise)
        return state.x

    alone = run(Noise([_core.make_generator(3)], [8]), 8)
    shared_noise = Noise([_core.make_generator(9), _core.make_generator(3)], [5, 8])
    shared = run(shared_noise, torch.tensor([32] * 5 + [8] * 8))  # a neighbour with 32
    torch.testing.assert_close(alone, shared[5:])


def test_ex2mcmc_rows_with_fewer_mala_steps_draw_only_their_own_noise():
    def run(noise, mala_steps):
        state = ex2mcmc.init(TWO_MODES.generator, TWO_MODES.log_ratio, noise, 1, step_size=0.02)
        state = state._replace(mala_steps=torch.as_tensor(mala_steps).expand(noise.batch_size))
        kernel = ex2mcmc.build(TWO_MODES.generator, TWO_MODES.log_ratio)
        for _ in range(4):
            state, _ = kernel.step(state, noise)
        return state.x

    alone = run(Noise([_core.make_generator(3)], [6]), 3)
    shared_noise = Noise([_core.make_generator(3), _core.make_generator(4)], [6, 4])
    shared = run(shared_noise, torch.tensor([3] * 6 + [7] * 4))
    torch.testing.assert_close(alone, shared[:6])
