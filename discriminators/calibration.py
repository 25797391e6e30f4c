"""Calibration of a discriminator's logits.

A calibrator maps RAW logits to CALIBRATED logits l(x), the estimate of log p(x)/p_G(x)
that the samplers use. Fit it on held-out real samples and as many fresh generator
samples, never on what the discriminator was trained on; `fit_and_report` does the
split and reports ECE, Brier score and Dawid's Z before ("none") and after.

    name        calibrated logit                        parameters
    none        l                                       -
    isotonic    logit(f(l)), f monotone, piecewise linear  thresholds (scikit-learn fit)
    logistic    a l + c  (Platt)                        a, c
    beta        a log D - b log(1 - D) + c, D = sigmoid(l), a, b >= 0   a, b, c

Classes are weighted equally when fitting, so the calibrated logit estimates
log p / p_G even when the real and generated sets differ in size. Every calibrator
clips its probabilities to [p_min, 1 - p_min]: by default p_min = 1 / (n + 2) for n fit
rows (a data set of n rows cannot vouch for a smaller probability), and never below
1e-6, so float32 probabilities are never exactly 0 or 1 and logits stay within
+-13.8. Applying a calibrator is torch-only and runs on any device; NaN in gives NaN
out (samplers reject NaN).

Example:
    >>> calibrators, report = fit_and_report(d(real_heldout), d(generator_samples))
    >>> save_calibration("calibration.json", calibrators, report)
    >>> calibrated = calibrators[best_calibration(report)](d(x))
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from discriminators.metrics import brier_score, dawid_z, expected_calibration_error

CALIBRATIONS = ("none", "isotonic", "logistic", "beta")
SMALLEST_P_MIN = 1e-6  # float32 sigmoid rounds to exactly 1 above a logit of about 16.6
RAW_LOGIT_LIMIT = 1e6  # raw logits are clamped here first, so +-inf stays finite
LOGISTIC_C = 1e4  # inverse L2 strength: almost unpenalised, yet finite on separable data


def p_min_for(n: int) -> float:
    """Default probability floor for a calibrator fitted on n rows."""
    return max(1.0 / (n + 2), SMALLEST_P_MIN)


class Calibrator:
    """Raw logit tensor -> calibrated logit tensor of the same shape.

    The result has the input's dtype when that is float32 or float64, else float32.
    """

    name: ClassVar[str]

    def __init__(self, p_min: float | None = None):
        assert p_min is None or SMALLEST_P_MIN <= p_min < 0.5, f"p_min out of range: {p_min}"
        self.requested_p_min = p_min
        self.p_min = p_min if p_min is not None else SMALLEST_P_MIN
        self.fitted = False

    @property
    def logit_limit(self) -> float:
        return math.log((1 - self.p_min) / self.p_min)

    def fit(self, raw_logit_real: Tensor, raw_logit_fake: Tensor) -> Self:
        """Fit on raw logits of real rows (label 1) and generated rows (label 0)."""
        logits, labels, weights = _fit_arrays(raw_logit_real, raw_logit_fake)
        self.p_min = self.requested_p_min or p_min_for(len(logits))
        self._fit(logits, labels, weights)
        self.fitted = True
        return self

    def __call__(self, raw_logit: Tensor) -> Tensor:
        assert self.fitted, f"{self.name} calibrator used before fit()"
        dtype = raw_logit.dtype if raw_logit.dtype in (torch.float32, torch.float64) else None
        raw = raw_logit.to(dtype or torch.float32).clamp(-RAW_LOGIT_LIMIT, RAW_LOGIT_LIMIT)
        limit = self.logit_limit
        return self._calibrate(raw).clamp(-limit, limit)

    def to_dict(self) -> dict[str, Any]:
        assert self.fitted, f"{self.name} calibrator saved before fit()"
        return {"type": self.name, "p_min": self.p_min, **self._parameters()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        assert data["type"] == cls.name, f"expected a {cls.name} calibrator, got {data['type']}"
        calibrator = cls(p_min=float(data["p_min"]))
        calibrator._load(data)
        calibrator.fitted = True
        return calibrator

    # Subclasses: fit on float64 arrays, calibrate a float tensor, (de)serialise parameters.
    def _fit(self, logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> None:
        raise NotImplementedError

    def _calibrate(self, raw: Tensor) -> Tensor:
        raise NotImplementedError

    def _parameters(self) -> dict[str, Any]:
        return {}

    def _load(self, data: dict[str, Any]) -> None:
        pass


class IdentityCalibrator(Calibrator):
    """ "none": raw logits, only clipped to the p_min range (1e-6 unless given)."""

    name = "none"

    def __init__(self, p_min: float | None = None):
        super().__init__(p_min)
        self.fitted = True  # nothing to learn

    def fit(self, raw_logit_real: Tensor, raw_logit_fake: Tensor) -> Self:
        return self  # keeps its p_min: "none" must not change what it reports on

    def _calibrate(self, raw: Tensor) -> Tensor:
        return raw


class LogisticCalibrator(Calibrator):
    """Platt scaling: a * l + c."""

    name = "logistic"

    def _fit(self, logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> None:
        self.coef, self.intercept = _logistic_regression(logits[:, None], labels, weights)

    def _calibrate(self, raw: Tensor) -> Tensor:
        return self.coef[0] * raw + self.intercept

    def _parameters(self) -> dict[str, Any]:
        return {"coef": list(self.coef), "intercept": self.intercept}

    def _load(self, data: dict[str, Any]) -> None:
        self.coef, self.intercept = [float(a) for a in data["coef"]], float(data["intercept"])


class BetaCalibrator(Calibrator):
    """Beta calibration (Kull et al. 2017): logistic regression on [log D, -log(1 - D)].

    Both coefficients are kept non-negative, so the map is monotone: where the fit
    gives one a negative coefficient, that feature is dropped and the fit repeated
    (the reference implementation's rule). With a = b it reduces to Platt scaling.
    """

    name = "beta"

    def _fit(self, logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> None:
        features = _beta_features(logits)  # (n, 2)
        coef, intercept = _logistic_regression(features, labels, weights)
        if min(coef) < 0:
            keep = int(np.argmax(coef))
            (kept,), intercept = _logistic_regression(features[:, [keep]], labels, weights)
            coef = [0.0, 0.0]
            if kept > 0:
                coef[keep] = kept
            else:  # no increasing map fits: the constant 1/2 of balanced classes
                intercept = 0.0
        self.coef, self.intercept = coef, intercept

    def _calibrate(self, raw: Tensor) -> Tensor:
        # log D = logsigmoid(l), -log(1 - D) = -logsigmoid(-l); no D is formed, so no
        # precision is lost where D rounds to 0 or 1.
        log_d, minus_log_1md = F.logsigmoid(raw), -F.logsigmoid(-raw)
        return self.coef[0] * log_d + self.coef[1] * minus_log_1md + self.intercept

    def _parameters(self) -> dict[str, Any]:
        return {"coef": list(self.coef), "intercept": self.intercept}

    def _load(self, data: dict[str, Any]) -> None:
        self.coef, self.intercept = [float(a) for a in data["coef"]], float(data["intercept"])


class IsotonicCalibrator(Calibrator):
    """Non-decreasing map of the logit to a probability, by scikit-learn's IsotonicRegression.

    Applied as scikit-learn predicts: linear interpolation of the probability between
    fitted thresholds, constant beyond the first and last one; here in torch.
    """

    name = "isotonic"

    def _fit(self, logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> None:
        from sklearn.isotonic import IsotonicRegression

        regression = IsotonicRegression(
            y_min=self.p_min, y_max=1 - self.p_min, increasing=True, out_of_bounds="clip"
        ).fit(logits, labels, sample_weight=weights)
        self.x_thresholds = [float(x) for x in regression.X_thresholds_]
        self.y_thresholds = [float(y) for y in regression.y_thresholds_]
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def _calibrate(self, raw: Tensor) -> Tensor:
        xs, ys = self._table(raw.device, raw.dtype)
        flat = raw.reshape(-1)
        if len(xs) == 1:
            prob = ys.expand_as(flat)
        else:
            x = flat.clamp(xs[0], xs[-1])
            right = torch.searchsorted(xs, x.contiguous(), right=True).clamp(1, len(xs) - 1)
            x0, x1, y0, y1 = xs[right - 1], xs[right], ys[right - 1], ys[right]
            prob = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        prob = prob.clamp(self.p_min, 1 - self.p_min)
        logit = torch.log(prob) - torch.log1p(-prob)
        return torch.where(flat.isnan(), flat, logit).reshape(raw.shape)

    def _table(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (device, dtype)
        if key not in self._tables:
            # Normal tensors even when first called under inference mode, so the same
            # calibrator also serves autograd callers (latent MALA).
            with torch.inference_mode(False):
                self._tables[key] = (
                    torch.tensor(self.x_thresholds, device=device, dtype=dtype),
                    torch.tensor(self.y_thresholds, device=device, dtype=dtype),
                )
        return self._tables[key]

    def _parameters(self) -> dict[str, Any]:
        return {"x_thresholds": self.x_thresholds, "y_thresholds": self.y_thresholds}

    def _load(self, data: dict[str, Any]) -> None:
        self.x_thresholds = [float(x) for x in data["x_thresholds"]]
        self.y_thresholds = [float(y) for y in data["y_thresholds"]]
        assert len(self.x_thresholds) == len(self.y_thresholds) >= 1, "bad isotonic table"
        self._tables = {}


CALIBRATOR_TYPES: dict[str, type[Calibrator]] = {
    cls.name: cls
    for cls in (IdentityCalibrator, IsotonicCalibrator, LogisticCalibrator, BetaCalibrator)
}
assert tuple(CALIBRATOR_TYPES) == CALIBRATIONS


def calibrator_from_dict(data: dict[str, Any]) -> Calibrator:
    """Rebuild any calibrator from its `to_dict()`."""
    assert data.get("type") in CALIBRATOR_TYPES, f"unknown calibration {data.get('type')!r}"
    return CALIBRATOR_TYPES[data["type"]].from_dict(data)


def fit_calibrators(
    raw_real: Tensor, raw_fake: Tensor, names: tuple[str, ...] = CALIBRATIONS
) -> dict[str, Calibrator]:
    """Fit one calibrator per name on raw logits of real and generated rows."""
    return {name: CALIBRATOR_TYPES[name]().fit(raw_real, raw_fake) for name in names}


def calibration_report(
    calibrators: dict[str, Calibrator], raw_real: Tensor, raw_fake: Tensor, bins: int = 15
) -> dict[str, dict[str, float]]:
    """{name: {"ece", "brier", "z"}} of each calibrator on these rows (real = 1).

    Include "none" for the figures before calibration. Pass rows the calibrators were
    not fitted on, and as many real as generated rows (the metrics read D as
    P(real), which is only calibrated against a 50/50 mix).
    """
    raw = torch.cat([raw_real.flatten(), raw_fake.flatten()])
    labels = torch.cat([torch.ones(raw_real.numel()), torch.zeros(raw_fake.numel())])
    report = {}
    for name, calibrator in calibrators.items():
        probs = torch.sigmoid(calibrator(raw).double())
        report[name] = {
            "ece": expected_calibration_error(probs, labels, bins),
            "brier": brier_score(probs, labels),
            "z": dawid_z(probs, labels),
        }
    return report


def fit_and_report(
    raw_real: Tensor, raw_fake: Tensor, seed: int = 0, fit_fraction: float = 0.5
) -> tuple[dict[str, Calibrator], dict[str, dict[str, float]]]:
    """Fit every calibration on one part of the rows and report on the rest.

    Both sets are shuffled (with `seed`) and cut to the size of the smaller one, so fit
    and evaluation see as many real as generated rows; `fit_fraction` of them fit the
    calibrators. Returns (calibrators, report) with report as in `calibration_report`,
    "none" being the raw discriminator.
    """
    n = min(raw_real.numel(), raw_fake.numel())
    n_fit = round(n * fit_fraction)
    assert 0 < n_fit < n, f"cannot split {n} rows per class with fit_fraction={fit_fraction}"
    gen = torch.Generator().manual_seed(seed)
    real = raw_real.detach().flatten().cpu()[torch.randperm(raw_real.numel(), generator=gen)[:n]]
    fake = raw_fake.detach().flatten().cpu()[torch.randperm(raw_fake.numel(), generator=gen)[:n]]
    calibrators = fit_calibrators(real[:n_fit], fake[:n_fit])
    return calibrators, calibration_report(calibrators, real[n_fit:], fake[n_fit:])


def best_calibration(report: dict[str, dict[str, float]], metric: str = "ece") -> str:
    """Name of the calibration with the lowest `metric` in a report."""
    return min(report, key=lambda name: report[name][metric])


def save_calibration(
    path: str | Path, calibrators: dict[str, Calibrator], report: dict[str, Any]
) -> None:
    """Write {"calibrators": {name: to_dict()}, "report": report} as strict JSON."""
    document = {
        "calibrators": {name: calibrator.to_dict() for name, calibrator in calibrators.items()},
        "report": report,
    }
    Path(path).write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")


def load_calibration(path: str | Path) -> tuple[dict[str, Calibrator], dict[str, Any]]:
    """Read what `save_calibration` wrote: (calibrators by name, report)."""
    document = json.loads(Path(path).read_text())
    calibrators = {
        name: calibrator_from_dict(data) for name, data in document["calibrators"].items()
    }
    return calibrators, document.get("report", {})


def _fit_arrays(raw_real: Tensor, raw_fake: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, labels (real 1) and class-balancing weights as float64 arrays."""
    real = torch.as_tensor(raw_real).detach().double().flatten().cpu().numpy()
    fake = torch.as_tensor(raw_fake).detach().double().flatten().cpu().numpy()
    assert len(real) > 0 and len(fake) > 0, "need real and generated rows"
    logits = np.clip(np.concatenate([real, fake]), -RAW_LOGIT_LIMIT, RAW_LOGIT_LIMIT)
    assert np.isfinite(logits).all(), "calibration data must be free of NaN"
    labels = np.concatenate([np.ones(len(real)), np.zeros(len(fake))])
    # Each class carries half the total weight: calibrated logits then estimate
    # log p / p_G rather than that plus log(n_real / n_fake).
    n = len(logits)
    weights = np.concatenate(
        [np.full(len(real), n / (2 * len(real))), np.full(len(fake), n / (2 * len(fake)))]
    )
    return logits, labels, weights


def _beta_features(logits: np.ndarray) -> np.ndarray:
    logits_t = torch.from_numpy(logits)
    return torch.stack([F.logsigmoid(logits_t), -F.logsigmoid(-logits_t)], dim=1).numpy()


def _logistic_regression(
    features: np.ndarray, labels: np.ndarray, weights: np.ndarray
) -> tuple[list[float], float]:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=LOGISTIC_C, max_iter=1000)
    model.fit(features, labels, sample_weight=weights)
    return [float(a) for a in model.coef_[0]], float(model.intercept_[0])
