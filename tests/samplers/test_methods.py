import pytest
import torch

from samplers import Noise, run_final
from samplers.methods import METHODS, MethodError, Models, options, prepare
from tests.samplers import targets
from tests.samplers.test_markov import exact_log_pair_symmetric


def _models(real=True):
    return Models(
        generator=targets.generator,
        latent_dim=1,
        log_ratio=targets.log_ratio,
        log_pair=exact_log_pair_symmetric,
        real=torch.full((10, 1), 1.5) if real else None,
    )


@pytest.mark.parametrize("method", METHODS)
def test_every_method_prepares_and_runs(method):
    noise = Noise.seeded(0, 64)
    params = {"scale": 1.0} if method == "markov" else {}
    kernel, state = prepare(method, _models(), params, noise)
    result = run_final(kernel, state, noise, 3)
    assert result.samples.shape == (64, 1)
    assert torch.isfinite(result.samples).all()
    assert not (result.samples == 1.5).any(), "a real start was returned"


def test_none_accepts_every_proposal():
    noise = Noise.seeded(0, 32)
    kernel, state = prepare("none", _models(), {}, noise)
    assert run_final(kernel, state, noise, 1).acceptance_rate == 1.0


def test_unknown_options_and_methods_are_refused():
    with pytest.raises(MethodError, match="unknown option"):
        options("pcn", {"step_size": 0.1})
    with pytest.raises(MethodError, match="unknown method"):
        options("hmc", {})


@pytest.mark.parametrize(
    "method,params,message",
    [
        ("pcn", {"beta": 1.5}, "beta"),
        ("mala", {"step_size": 0.0}, "step_size"),
        ("imh", {"init": "zero"}, "init"),
    ],
)
def test_out_of_range_options_are_refused(method, params, message):
    with pytest.raises(MethodError, match=message):
        prepare(method, _models(), params, Noise.seeded(0, 4))


def test_markov_without_pair_discriminator_is_refused():
    models = Models(generator=targets.generator, latent_dim=1, log_ratio=targets.log_ratio)
    with pytest.raises(MethodError, match="pair"):
        prepare("markov", models, {}, Noise.seeded(0, 4))


def test_real_init_falls_back_to_generator_without_real_samples():
    noise = Noise.seeded(0, 8)
    _, state = prepare("imh", _models(real=False), {"init": "real"}, noise)
    assert not state.is_real.any()
