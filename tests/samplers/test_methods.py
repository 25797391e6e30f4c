import re
import typing

import pytest
import torch

import samplers
from samplers import Noise, run_final
from samplers.methods import DEFAULTS, METHODS, TABLE, MethodError, Models, options, prepare
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


def test_table_is_the_one_list_of_methods():
    assert METHODS == tuple(TABLE) == samplers.METHODS
    assert set(DEFAULTS) == set(METHODS)
    for name, spec in TABLE.items():
        assert spec.name == name and spec.summary
        assert DEFAULTS[name] == {option.name: option.default for option in spec.options}
        for option in spec.options:
            assert option.description and option.type in (int, float, str, bool)
            if option.default is not None and option.default != "auto":
                assert option.check(option.default) == option.default
    assert {"isir", "ex2mcmc"} <= set(METHODS)


@pytest.mark.parametrize(
    "method,params,message",
    [
        ("isir", {"particles": 1}, "'particles' must be >= 2"),
        ("isir", {"particles": 2.5}, "'particles' must be int"),
        ("isir", {"particles": True}, "'particles' must be int"),
        ("isir", {"scale": "wide"}, "'scale' must be float"),
        ("mala", {"step_size": "fast"}, "'step_size' must be float or \"auto\""),
        ("mala", {"step_size": float("nan")}, "'step_size' must be finite"),
        ("ex2mcmc", {"mala_steps": 0}, "'mala_steps' must be >= 1"),
        ("ex2mcmc", {"warmup": -1}, "'warmup' must be >= 0"),
        ("drs", {"gamma": 0.0, "gamma_percentile": 80.0}, "not both"),
        ("drs", {"max_proposals_per_sample": 0}, "max_proposals_per_sample"),
        ("markov", {"proposal": "learned"}, "'proposal' must be one of"),
        ("isir", {"beta": 0.5}, "unknown option"),
    ],
)
def test_options_are_checked_from_the_table(method, params, message):
    with pytest.raises(MethodError, match=re.escape(message)):
        options(method, params)


def test_option_values_are_normalised():
    assert options("pcn", {"beta": 1})["beta"] == 1.0 and isinstance(
        options("pcn", {"beta": 1})["beta"], float
    )
    assert options("mala", {"step_size": None})["step_size"] == "auto"  # None: the default
    assert options("drs", {"gamma": 0.5})["gamma_percentile"] is None


def test_options_translate_to_request_model_fields():
    beta = TABLE["pcn"].options[0]
    assert beta.annotation is float and beta.constraints == {"gt": 0, "le": 1}
    init = TABLE["imh"].options[0]
    assert typing.get_args(init.annotation) == ("real", "generator")
    step = TABLE["mala"].options[0]
    assert set(typing.get_args(step.annotation)) == {float, typing.Literal["auto"]}
    percentile = next(o for o in TABLE["drs"].options if o.name == "gamma_percentile")
    assert type(None) in typing.get_args(percentile.annotation)


def test_prepare_derives_warmup_from_steps():
    noise = Noise.seeded(0, 4)
    _, state = prepare("mala", _models(), {}, noise, steps=30)
    assert state.warmup_left.tolist() == [15] * 4
    _, state = prepare("ex2mcmc", _models(), {"warmup": 7}, noise, steps=30)
    assert state.warmup_left.tolist() == [7] * 4
    _, state = prepare("mala", _models(), {"step_size": 0.05}, noise, steps=30)
    assert state.warmup_left.tolist() == [0] * 4
    assert state.step_size.tolist() == pytest.approx([0.05] * 4)


def test_proposals_per_step_counts_candidates():
    assert TABLE["imh"].proposals_per_step(options("imh")) == 1
    assert TABLE["isir"].proposals_per_step(options("isir", {"particles": 5})) == 4
    ex2 = options("ex2mcmc", {"particles": 5, "mala_steps": 2})
    assert TABLE["ex2mcmc"].proposals_per_step(ex2) == 6


@pytest.mark.parametrize("method", METHODS)
def test_trace_is_given_where_a_chain_has_a_score(method):
    noise = Noise.seeded(0, 16)
    params = {"scale": 1.0} if method == "markov" else {}
    kernel, state = prepare(method, _models(), params, noise, steps=4)
    _, info = kernel.step(state, noise)
    if method in ("none", "drs", "markov"):
        assert info.trace is None
    else:
        assert info.trace.shape == (16,) and torch.isfinite(info.trace).all()
    assert (info.in_warmup is not None) == (method in ("mala", "ex2mcmc"))


@pytest.mark.parametrize("method", METHODS)
def test_request_models_built_from_the_table_check_what_the_table_checks(method):
    pydantic = pytest.importorskip("pydantic")
    spec = TABLE[method]
    fields = {
        o.name: (
            o.constrained(pydantic.Field),
            pydantic.Field(o.default, description=o.description),
        )
        for o in spec.options
    }
    model = pydantic.create_model(f"{method}Params", **fields)
    assert model().model_dump() == spec.defaults
    for option in spec.options:
        if option.gt is not None:
            with pytest.raises(pydantic.ValidationError):
                model(**{option.name: option.gt})
            with pytest.raises(MethodError):
                options(method, {option.name: option.gt})
        if option.auto:
            assert getattr(model(**{option.name: "auto"}), option.name) == "auto"
