"""Stochastic Batch Normalization: conversion, fitted statistics, sampled predictions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from classifiers import sbn


def small_bn_net() -> nn.Sequential:
    """conv-BN2d-ReLU, linear-BN1d-ReLU, logits; running statistics moved off their init."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(6, 3),
    )
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(module.weight, 0.5, 2.0)
            nn.init.uniform_(module.bias, -1.0, 1.0)
    net.train()
    for batch in training_batches(10, seed=1):
        net(batch)
    return net.eval()


def training_batches(count: int, seed: int, size: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 1, 8, 8, generator=generator) * 2 + 0.5 for _ in range(count)]


def fitted_sbn_net() -> nn.Module:
    return sbn.fit_statistics(sbn.convert(small_bn_net()), training_batches(20, seed=2))


def inputs(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def test_convert_keeps_deterministic_predictions():
    original = small_bn_net()
    x = inputs(32)
    expected = original(x)
    converted = sbn.convert(copy.deepcopy(original))
    assert len(sbn.sbn_layers(converted)) == 2
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=1e-6)
    deterministic = sbn.predict_deterministic(converted, x)
    torch.testing.assert_close(deterministic.probs, expected.softmax(-1), rtol=0, atol=1e-6)
    assert deterministic.mutual_information.abs().max() == 0


def test_convert_keeps_training_mode_behaviour_and_is_idempotent():
    original = small_bn_net().train()
    converted = sbn.convert(copy.deepcopy(original))
    assert sbn.convert(converted) is converted and len(sbn.sbn_layers(converted)) == 2
    batch = inputs(16)
    torch.manual_seed(5)  # same dropout mask for both
    expected = original(batch)
    torch.manual_seed(5)
    torch.testing.assert_close(converted(batch), expected, rtol=0, atol=1e-6)
    for bn, layer in zip(
        [m for m in original.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)],
        sbn.sbn_layers(converted),
        strict=True,
    ):
        torch.testing.assert_close(layer.running_mean, bn.running_mean)


def test_fit_statistics_match_smoothing_by_hand():
    """Replicate the fit with torch's own train-mode BN: hooks read each BN's input."""
    reference = small_bn_net()
    batches = training_batches(12, seed=4)
    momentum = 0.1
    inputs_seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    bns = [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]
    for index, bn in enumerate(bns):
        bn.register_forward_hook(lambda _m, args, _o, i=index: inputs_seen[i].append(args[0]))
    reference.train()
    for module in reference.modules():
        if isinstance(module, nn.Dropout):
            module.eval()  # fit_statistics runs everything but the BN layers in eval mode
    with torch.no_grad():
        for batch in batches:
            reference(batch)

    model = sbn.fit_statistics(sbn.convert(small_bn_net()), batches, momentum=momentum)
    for index, layer in enumerate(sbn.sbn_layers(model)):
        expected = None
        for x in inputs_seen[index]:
            dims = [0, *range(2, x.dim())]
            mean = x.mean(dims)
            log_var = (x.var(dims, unbiased=False) + layer.eps).log()
            values = torch.stack([mean, mean**2, log_var, log_var**2])
            expected = values if expected is None else (1 - momentum) * expected + momentum * values
        got = torch.stack([getattr(layer, name) for name in sbn.SBN_BUFFERS[:4]])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert int(layer.batches_fitted) == len(batches)
        # the fit leaves the deterministic (running) statistics alone
        assert not torch.equal(layer.batch_mean_avg, layer.running_mean)


def test_fit_statistics_starts_afresh_and_state_dict_carries_statistics():
    model = fitted_sbn_net()
    first = copy.deepcopy(model.state_dict())
    sbn.fit_statistics(model, training_batches(20, seed=2))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, first[key])
    fresh = sbn.convert(small_bn_net())
    fresh.load_state_dict(first)
    generator_a, generator_b = (torch.Generator().manual_seed(0) for _ in range(2))
    torch.testing.assert_close(
        sbn.predict(fresh, inputs(), 8, generator_a).probs,
        sbn.predict(model, inputs(), 8, generator_b).probs,
    )


def test_sampled_prediction_is_a_distribution_with_entropy_above_mutual_information():
    prediction = sbn.predict(fitted_sbn_net(), inputs(16), 64, torch.Generator().manual_seed(0))
    assert prediction.probs.shape == (16, 3)
    torch.testing.assert_close(prediction.probs.sum(-1), torch.ones(16))
    assert (prediction.mutual_information > 1e-4).all()  # the draws do move the output
    assert (prediction.entropy >= prediction.mutual_information).all()
    assert (prediction.mutual_information >= 0).all()
    assert torch.equal(prediction.label, prediction.probs.argmax(-1))


def test_same_seed_same_answer_different_seed_different_answer():
    model = fitted_sbn_net()

    def run(seed: int) -> torch.Tensor:
        return sbn.predict(model, inputs(), 16, torch.Generator().manual_seed(seed)).probs

    assert torch.equal(run(7), run(7))
    assert (run(7) - run(8)).abs().max() > 1e-4


def test_each_row_of_the_virtual_batch_gets_its_own_statistics():
    model = fitted_sbn_net()
    outputs: list[torch.Tensor] = []
    first_layer = sbn.sbn_layers(model)[0]
    first_layer.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    samples = 5
    sbn.predict(model, inputs(2), samples, torch.Generator().manual_seed(0))
    rows = outputs[0].reshape(2, samples, -1)  # (inputs, K, C*H*W); K copies of each input
    for copies in rows:
        distances = torch.cdist(copies, copies)
        assert (distances + torch.eye(samples) * 1e9 > 1e-3).all()


def test_draws_follow_the_fitted_normal_and_log_normal():
    """Read each row's drawn mean and variance back from two input values per channel."""
    layer = sbn.StochasticBatchNorm2d(3, affine=False)
    m1, sd_mean = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.1, 0.3, 0.05])
    l1, sd_log_var = torch.tensor([0.0, -2.0, 1.0]), torch.tensor([0.2, 0.05, 0.4])
    layer.batch_mean_avg.copy_(m1)
    layer.batch_mean_sq_avg.copy_(m1**2 + sd_mean**2)
    layer.batch_log_var_avg.copy_(l1)
    layer.batch_log_var_sq_avg.copy_(l1**2 + sd_log_var**2)
    layer.batches_fitted.fill_(1)
    rows = 20000
    x = torch.zeros(rows, 3, 1, 2)
    x[..., 1] = 1.0  # out = (x - mu) / sqrt(var + eps): two values give mu and var back
    token = sbn._MODE.set(sbn._Mode("sample", generator=torch.Generator().manual_seed(0)))
    try:
        out = layer(x)
    finally:
        sbn._MODE.reset(token)
    inv_std = out[..., 0, 1] - out[..., 0, 0]  # (rows, 3)
    mean = -out[..., 0, 0] / inv_std
    log_var = -2 * inv_std.log()
    tolerance = 4 / rows**0.5  # four standard errors, in units of the std
    assert ((mean.mean(0) - m1).abs() < tolerance * sd_mean).all()
    assert ((mean.std(0) / sd_mean - 1).abs() < 4 * (0.5 / rows) ** 0.5).all()
    assert ((log_var.mean(0) - l1).abs() < tolerance * sd_log_var).all()
    assert ((log_var.std(0) / sd_log_var - 1).abs() < 4 * (0.5 / rows) ** 0.5).all()
    # and the two draws of a row are independent
    correlation = torch.corrcoef(torch.stack([mean[:, 0], log_var[:, 0]]))[0, 1]
    assert correlation.abs() < tolerance


@pytest.mark.parametrize(
    ("x", "samples", "message"),
    [
        (torch.zeros(4, 1, 7, 8), 8, "shape"),
        (torch.zeros(4, 64), 8, "shape"),
        (torch.full((4, 1, 8, 8), float("nan")), 8, "NaN"),
        (torch.zeros(4, 1, 8, 8).index_fill_(0, torch.tensor([1]), float("inf")), 8, "NaN"),
        (torch.zeros(0, 1, 8, 8), 8, "at least one"),
        (torch.zeros(4, 1, 8, 8, dtype=torch.long), 8, "floating"),
        (torch.zeros(4, 1, 8, 8), 0, "samples"),
        (torch.zeros(4, 1, 8, 8), sbn.MAX_SAMPLES + 1, "samples"),
        (torch.zeros(4, 1, 8, 8), 2.5, "samples"),
    ],
)
def test_predict_rejects_bad_input(x, samples, message):
    model = fitted_sbn_net()
    with pytest.raises(ValueError, match=message):
        sbn.predict(model, x, samples, input_shape=(1, 8, 8))


def test_predict_uses_the_models_input_shape_and_deterministic_validates_too():
    model = fitted_sbn_net()
    model.input_shape = (1, 8, 8)
    with pytest.raises(ValueError, match="shape"):
        sbn.predict(model, torch.zeros(2, 1, 8, 9), 4)
    with pytest.raises(ValueError, match="NaN"):
        sbn.predict_deterministic(model, torch.full((2, 1, 8, 8), float("nan")))


def test_predict_needs_a_converted_and_fitted_model():
    with pytest.raises(ValueError, match="convert"):
        sbn.predict(small_bn_net(), inputs(), 4)
    with pytest.raises(ValueError, match="fit_statistics"):
        sbn.predict(sbn.convert(small_bn_net()), inputs(), 4)
    with pytest.raises(ValueError, match="more than one value"):
        sbn.fit_statistics(sbn.convert(small_bn_net()), [torch.zeros(1, 1, 8, 8)])
    with pytest.raises(ValueError, match="no batches"):
        sbn.fit_statistics(sbn.convert(small_bn_net()), [])


def test_predict_leaves_the_model_in_its_mode_and_chunks_large_virtual_batches(monkeypatch):
    model = fitted_sbn_net().train()
    whole = sbn.predict(model, inputs(6), 4, torch.Generator().manual_seed(0))
    assert model.training
    monkeypatch.setattr(sbn, "MAX_ROWS_PER_PASS", 8)  # two inputs per pass
    monkeypatch.setattr(sbn, "CPU_ROWS_PER_PASS", 8)
    passes: list[int] = []
    model.register_forward_hook(lambda _m, args, _o: passes.append(len(args[0])))
    chunked = sbn.predict(model, inputs(6), 4, torch.Generator().manual_seed(0))
    assert passes == [8, 8, 8]
    assert chunked.probs.shape == whole.probs.shape
    torch.testing.assert_close(chunked.probs.sum(-1), torch.ones(6))


def test_mc_batchnorm_with_the_whole_training_set_matches_its_batch_statistics():
    """One pass, batch = all training rows: same as BN normalising with their statistics."""
    train_x = training_batches(1, seed=6, size=24)[0]
    model = sbn.convert(small_bn_net())
    prediction = sbn.predict_mc_batchnorm(model, inputs(), train_x, 3, len(train_x))
    reference = small_bn_net()
    for module in reference.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum, module.track_running_stats = 1.0, True
    reference.train()
    reference[7].eval()  # dropout off
    with torch.no_grad():
        reference(train_x)  # running stats := this batch's mean and unbiased variance
    reference.eval()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                count = train_x.numel() / train_x.shape[1] if module is reference[1] else 24
                module.running_var *= (count - 1) / count  # the biased variance BN divides by
        expected = reference(inputs()).softmax(-1)
    torch.testing.assert_close(prediction.probs, expected, rtol=1e-4, atol=1e-5)
    assert prediction.mutual_information.max() < 1e-5  # every pass used the same batch


def test_mc_batchnorm_varies_between_minibatches():
    model = fitted_sbn_net()
    train_x = torch.cat(training_batches(4, seed=6))
    prediction = sbn.predict_mc_batchnorm(
        model, inputs(), train_x, 16, 16, torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(prediction.probs.sum(-1), torch.ones(len(inputs())))
    assert (prediction.mutual_information > 1e-4).all()
    with pytest.raises(ValueError, match="batch_size"):
        sbn.predict_mc_batchnorm(model, inputs(), train_x, 4, 1)
