"""Calibrators on a deliberately miscalibrated discriminator.

Real x ~ N(1, 1), generated x ~ N(0, 1): the true log ratio is t(x) = x - 1/2. The
"discriminator" reports raw = 3 t + 1, right in ranking but over-confident and biased.
"""

import json
import math

import numpy as np
import pytest
import torch
from sklearn.isotonic import IsotonicRegression

from discriminators import calibration
from discriminators.calibration import (
    CALIBRATIONS,
    BetaCalibrator,
    IdentityCalibrator,
    IsotonicCalibrator,
    LogisticCalibrator,
    best_calibration,
    calibration_report,
    calibrator_from_dict,
    fit_and_report,
    fit_calibrators,
    load_calibration,
    save_calibration,
)

SCALE, SHIFT = 3.0, 1.0


def true_log_ratio(x: torch.Tensor) -> torch.Tensor:
    return x - 0.5


def raw_logits(n_real: int, n_fake: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    real = 1.0 + torch.randn(n_real, generator=gen)
    fake = torch.randn(n_fake, generator=gen)
    return SCALE * true_log_ratio(real) + SHIFT, SCALE * true_log_ratio(fake) + SHIFT


@pytest.fixture(scope="module")
def fitted():
    raw_real, raw_fake = raw_logits(20_000, 20_000, seed=0)
    return fit_and_report(raw_real, raw_fake, seed=0)


def test_every_calibrator_lowers_ece_on_held_out_rows(fitted):
    calibrators, report = fitted
    assert set(calibrators) == set(report) == set(CALIBRATIONS)
    assert report["none"]["ece"] > 0.1
    for name in ("isotonic", "logistic", "beta"):
        assert report[name]["ece"] < 0.02 < report["none"]["ece"], name
        assert report[name]["brier"] < report["none"]["brier"], name
        assert abs(report[name]["z"]) < 3 < abs(report["none"]["z"]), name
    assert best_calibration(report) != "none"


def test_logistic_and_beta_recover_the_true_scale_and_shift(fitted):
    calibrators, _ = fitted
    logistic, beta = calibrators["logistic"], calibrators["beta"]
    assert logistic.coef[0] == pytest.approx(1 / SCALE, abs=0.02)
    assert logistic.intercept == pytest.approx(-SHIFT / SCALE, abs=0.05)
    # beta contains Platt scaling as a = b; the truth lies there.
    assert beta.coef == pytest.approx([1 / SCALE, 1 / SCALE], abs=0.03)
    x = torch.linspace(-2.0, 3.0, 101)
    raw = SCALE * true_log_ratio(x) + SHIFT
    for name in ("logistic", "beta"):
        error = (calibrators[name](raw) - true_log_ratio(x)).abs().max().item()
        assert error < 0.25, name
    # isotonic is non-parametric: good where the data are dense.
    central = torch.linspace(-0.5, 1.5, 41)
    error = calibrators["isotonic"](SCALE * true_log_ratio(central) + SHIFT) - true_log_ratio(
        central
    )
    assert error.abs().max().item() < 0.3


def test_isotonic_is_monotone_and_matches_scikit_learn():
    raw_real, raw_fake = raw_logits(2_000, 2_000, seed=1)
    calibrator = IsotonicCalibrator().fit(raw_real, raw_fake)
    x = torch.linspace(-20, 20, 4001, dtype=torch.float64)
    out = calibrator(x)
    assert (out.diff() >= 0).all()
    assert out[-1] > out[0] + 5
    reference = IsotonicRegression(
        y_min=calibrator.p_min, y_max=1 - calibrator.p_min, out_of_bounds="clip"
    ).fit(torch.cat([raw_real, raw_fake]).double().numpy(), np.r_[np.ones(2000), np.zeros(2000)])
    expected = torch.logit(torch.from_numpy(reference.predict(x.numpy())))
    assert torch.allclose(out, expected, atol=1e-9)


def test_beta_stays_non_decreasing_for_an_anti_correlated_discriminator():
    raw_real, raw_fake = raw_logits(2_000, 2_000, seed=2)
    beta = BetaCalibrator().fit(-raw_real, -raw_fake)
    assert min(beta.coef) >= 0
    assert (beta(torch.linspace(-10, 10, 201)).diff() >= 0).all()
    assert LogisticCalibrator().fit(-raw_real, -raw_fake).coef[0] < 0  # Platt would flip


def test_unequal_class_sizes_are_weighted_out():
    # Without class weights the intercept would absorb log(1000 / 4000).
    raw_real, raw_fake = raw_logits(1_000, 4_000, seed=3)
    logistic = LogisticCalibrator().fit(raw_real, raw_fake)
    assert logistic.intercept == pytest.approx(-SHIFT / SCALE, abs=0.15)
    isotonic = IsotonicCalibrator().fit(raw_real, raw_fake)
    assert isotonic(torch.tensor([SHIFT])).item() == pytest.approx(0.0, abs=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_raw_logits_give_finite_logits_and_probabilities_strictly_inside(fitted, dtype):
    calibrators, _ = fitted
    extreme = torch.tensor([-math.inf, -1e30, -1e4, -50.0, 0.0, 50.0, 1e4, 1e30, math.inf])
    for name, calibrator in calibrators.items():
        logit = calibrator(extreme.to(dtype))
        probs = torch.sigmoid(logit)
        assert logit.dtype == dtype and torch.isfinite(logit).all(), name
        assert ((probs > 0) & (probs < 1)).all(), name
        assert (probs >= calibrator.p_min * (1 - 1e-5)).all(), name
        assert (logit.diff() >= 0).all(), name


def test_nan_in_gives_nan_out(fitted):
    calibrators, _ = fitted
    raw = torch.tensor([0.0, math.nan, 1.0])
    for name, calibrator in calibrators.items():
        assert calibrator(raw).isnan().tolist() == [False, True, False], name


def test_calibrators_keep_shape_and_device(fitted):
    calibrators, _ = fitted
    raw = torch.randn(3, 4, 5)
    for calibrator in calibrators.values():
        out = calibrator(raw)
        assert out.shape == raw.shape and out.device == raw.device


def test_identity_only_clips():
    raw = torch.tensor([-100.0, -3.0, 0.0, 5.0, 100.0])
    out = IdentityCalibrator()(raw)
    assert out[1:4].tolist() == raw[1:4].tolist()
    assert out[-1].item() == pytest.approx(math.log((1 - 1e-6) / 1e-6), rel=1e-6)


def test_to_dict_from_dict_round_trip_gives_identical_outputs(fitted):
    calibrators, _ = fitted
    raw = torch.linspace(-15, 15, 3001)
    for name, calibrator in calibrators.items():
        data = json.loads(json.dumps(calibrator.to_dict()))
        restored = calibrator_from_dict(data)
        assert type(restored) is type(calibrator) and data["type"] == name
        assert torch.equal(restored(raw), calibrator(raw)), name
    assert "x_thresholds" in calibrators["isotonic"].to_dict()


def test_save_and_load_calibration_round_trip(fitted, tmp_path):
    calibrators, report = fitted
    path = tmp_path / "calibration.json"
    save_calibration(path, calibrators, report)
    document = json.loads(path.read_text())
    assert set(document) == {"calibrators", "report"}
    loaded, loaded_report = load_calibration(path)
    assert loaded_report == report
    raw = torch.linspace(-15, 15, 301)
    for name in CALIBRATIONS:
        assert torch.equal(loaded[name](raw), calibrators[name](raw)), name


def test_fit_and_report_fits_and_evaluates_on_disjoint_balanced_rows(monkeypatch):
    seen = {}
    real_fit, real_report = calibration.fit_calibrators, calibration.calibration_report

    def spy_fit(raw_real, raw_fake):
        seen["fit"] = (raw_real, raw_fake)
        return real_fit(raw_real, raw_fake)

    def spy_report(calibrators, raw_real, raw_fake):
        seen["report"] = (raw_real, raw_fake)
        return real_report(calibrators, raw_real, raw_fake)

    monkeypatch.setattr(calibration, "fit_calibrators", spy_fit)
    monkeypatch.setattr(calibration, "calibration_report", spy_report)
    raw_real, raw_fake = raw_logits(300, 500, seed=4)
    fit_and_report(raw_real, raw_fake, seed=0, fit_fraction=0.4)
    (fit_real, fit_fake), (eval_real, eval_fake) = seen["fit"], seen["report"]
    assert len(fit_real) == len(fit_fake) == 120 and len(eval_real) == len(eval_fake) == 180
    assert not set(fit_real.tolist()) & set(eval_real.tolist())
    assert not set(fit_fake.tolist()) & set(eval_fake.tolist())
    assert set(fit_real.tolist()) | set(eval_real.tolist()) == set(raw_real.tolist())
    assert set(fit_fake.tolist()) | set(eval_fake.tolist()) <= set(raw_fake.tolist())


def test_report_on_fit_rows_differs_from_held_out_report():
    # Isotonic regression overfits its own rows: the held-out split is what keeps the
    # reported ECE honest.
    raw_real, raw_fake = raw_logits(300, 300, seed=5)
    calibrators = fit_calibrators(raw_real, raw_fake, names=("isotonic",))
    on_fit_rows = calibration_report(calibrators, raw_real, raw_fake)["isotonic"]["ece"]
    _, held_out = fit_and_report(raw_real, raw_fake)
    assert on_fit_rows < 1e-3 and held_out["isotonic"]["ece"] > 0.01


def test_unfitted_calibrator_is_refused():
    with pytest.raises(AssertionError, match="before fit"):
        LogisticCalibrator()(torch.zeros(3))


def test_isotonic_first_used_under_inference_mode_still_serves_autograd():
    import torch

    from discriminators.calibration import IsotonicCalibrator

    calibrator = IsotonicCalibrator().fit(torch.randn(200) + 1, torch.randn(200))
    with torch.inference_mode():
        calibrator(torch.zeros(3))
    x = torch.zeros(3, requires_grad=True)
    calibrator(x * 2).sum().backward()
    assert x.grad is not None
