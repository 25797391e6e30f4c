import warnings

import numpy as np
import pytest
import torch

from samplers import Noise, diagnostics
from samplers.diagnostics import TraceRecorder, ess, r_hat
from samplers.methods import Models, prepare
from tests.samplers.targets import TWO_MODES


def _ar1(chains: int, draws: int, rho: float, seed: int, offsets=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.zeros((chains, draws))
    x[:, 0] = rng.normal(size=chains)
    for t in range(1, draws):
        x[:, t] = rho * x[:, t - 1] + np.sqrt(1 - rho**2) * rng.normal(size=chains)
    return x + (0.0 if offsets is None else np.asarray(offsets)[:, None])


TRACES = {
    "iid": lambda: np.random.default_rng(0).normal(size=(4, 200)),
    "ar1-sticky": lambda: _ar1(8, 301, 0.95, seed=1),
    "ar1-odd-draws": lambda: _ar1(3, 77, 0.5, seed=2),
    "stuck-apart": lambda: _ar1(6, 100, 0.9, seed=3, offsets=[0, 0, 0, 3, 3, 3]),
    "scales-differ": lambda: _ar1(4, 400, 0.3, seed=4) * np.array([[1], [1], [5], [5]]),
    "heavy-tails": lambda: np.random.default_rng(5).standard_t(2, size=(4, 500)),
    "many-chains": lambda: _ar1(256, 64, 0.7, seed=6),
}


@pytest.fixture(scope="module")
def arviz():
    with warnings.catch_warnings():  # arviz announces its own refactor on import
        warnings.simplefilter("ignore")
        return pytest.importorskip("arviz")


@pytest.mark.parametrize("name", list(TRACES))
def test_r_hat_and_ess_agree_with_arviz(arviz, name):
    trace = TRACES[name]()
    assert r_hat(trace) == pytest.approx(float(arviz.rhat(trace)), rel=0.01)
    assert ess(trace) == pytest.approx(float(arviz.ess(trace)), rel=0.01)


def test_sampler_traces_agree_with_arviz(arviz):
    for method, params in (("isir", {}), ("mala", {"step_size": 1e-3})):
        trace = _record(method, params, steps=60).trace()
        assert r_hat(trace) == pytest.approx(float(arviz.rhat(trace)), rel=0.01)
        assert ess(trace) == pytest.approx(float(arviz.ess(trace)), rel=0.01)


def test_undefined_cases_are_nan():
    assert np.isnan(r_hat(np.zeros((1, 100))))  # one chain
    assert np.isnan(r_hat(np.random.default_rng(0).normal(size=(4, 3))))  # three draws
    assert np.isnan(ess(np.full((2, 10), np.nan)))


def _record(method, params, steps, chains=64, seed=0, recorder=None):
    models = Models(generator=TWO_MODES.generator, latent_dim=1, log_ratio=TWO_MODES.log_ratio)
    noise = Noise.seeded(seed, chains)
    kernel, state = prepare(method, models, params, noise, steps=steps)
    recorder = recorder or TraceRecorder()
    for _ in range(steps):
        state, info = kernel.step(state, noise)
        recorder.record(info.trace, info.in_warmup)
    return recorder


def test_chains_that_cannot_mix_raise_the_warning():
    # A tiny fixed Langevin step on two well-separated modes: each chain stays where
    # it started, in one mode or between them.
    summary = _record("mala", {"step_size": 1e-4}, steps=200).summary()
    assert summary["r_hat"] is None or summary["r_hat"] > diagnostics.R_HAT_LIMIT
    assert any(w.startswith("chains did not mix: split R-hat") for w in summary["warnings"])


@pytest.mark.parametrize("method", ["isir", "ex2mcmc"])
def test_well_mixed_chains_do_not(method):
    summary = _record(method, {}, steps=200).summary()
    assert summary["warnings"] == [] and summary["reason"] is None
    assert summary["r_hat"] < 1.02 and summary["ess"] > 64
    assert summary["chains"] == 64 and summary["draws"] in (100, 200)  # ex2mcmc warms up


def test_warmup_steps_are_not_traced():
    summary = _record("mala", {}, steps=40).summary()
    assert summary["draws"] == 20  # "auto": the first 20 of 40 steps are warm-up


def test_recorder_keeps_at_most_its_chains_and_draws_and_thins_evenly():
    recorder = TraceRecorder(max_chains=8, max_draws=100)
    full = np.random.default_rng(0).normal(size=(16, 10_000))
    for t in range(10_000):
        recorder.record(torch.from_numpy(full[:, t]))
    kept = recorder.trace()
    assert kept.shape[0] == 8 and 50 <= kept.shape[1] <= 100
    assert recorder.values.shape == (8, 100)
    stride = recorder.stride
    np.testing.assert_array_equal(kept, full[:8, ::stride][:, : kept.shape[1]])


def test_summary_says_why_when_undefined():
    short = TraceRecorder()
    for _ in range(3):
        short.record(torch.zeros(10).normal_())
    summary = short.summary()
    assert summary["r_hat"] is None and summary["ess"] is None
    assert "too short" in summary["reason"] and summary["warnings"] == []
    untraced = TraceRecorder()
    untraced.record(None)
    assert "no per-chain trace" in untraced.summary()["reason"]
    one_chain = TraceRecorder()
    for _ in range(50):
        one_chain.record(torch.zeros(1).normal_())
    assert one_chain.summary()["r_hat"] is None


def test_warnings_are_plain_english():
    found = diagnostics.warnings(1.31, 10.0, chains=64)
    assert found[0].startswith("chains did not mix: split R-hat 1.31 > 1.05")
    assert found[1].startswith("chains barely moved: effective sample size 10 < 0.5 x 64")
    assert diagnostics.warnings(1.01, 500.0, chains=64) == []


def test_recorder_follows_the_first_chains_when_the_batch_changes():
    recorder = TraceRecorder(max_chains=4, max_draws=50)
    for t in range(20):
        rows = 6 if t < 10 else 3  # rows leave the batch halfway
        recorder.record(torch.full((rows,), float(t)))
    assert recorder.counts.tolist() == [20, 20, 20, 10]
    assert recorder.trace().shape == (4, 10)
