import math

import torch

from discriminators.metrics import brier_score, dawid_z, expected_calibration_error

F64 = torch.float64


def bernoulli_rows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities uniform on (0, 1) and labels drawn from exactly those probabilities."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand(n, generator=gen, dtype=torch.float64)
    labels = (torch.rand(n, generator=gen, dtype=torch.float64) < probs).double()
    return probs, labels


def test_ece_of_known_reliability_diagrams():
    # Every row predicts 0.3 and 30 % are positive: calibrated, ECE 0.
    labels = torch.tensor([1.0] * 3 + [0.0] * 7, dtype=F64)
    assert expected_calibration_error(torch.full((10,), 0.3, dtype=F64), labels) < 1e-12
    # Always 0.9 but never positive: the gap is 0.9.
    assert math.isclose(
        expected_calibration_error(torch.full((10,), 0.9, dtype=F64), torch.zeros(10)), 0.9
    )
    # Two bins of 5 rows, gaps 0.2 and 0.4: ECE is their average.
    probs = torch.tensor([0.2] * 5 + [0.8] * 5, dtype=F64)
    labels = torch.tensor([0.0] * 5 + [1.0, 1.0, 0.0, 0.0, 0.0])
    assert math.isclose(expected_calibration_error(probs, labels), (0.2 + 0.4) / 2)


def test_ece_puts_probability_one_in_the_last_bin():
    assert expected_calibration_error(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])) == 0.0


def test_brier_score_is_the_mean_squared_error():
    probs, labels = torch.tensor([0.1, 0.8, 0.5], dtype=F64), torch.tensor([0.0, 1.0, 1.0])
    assert math.isclose(brier_score(probs, labels), (0.01 + 0.04 + 0.25) / 3)


def test_dawid_z_is_near_zero_when_calibrated_and_large_when_not():
    probs, labels = bernoulli_rows(20_000, seed=0)
    assert abs(dawid_z(probs, labels)) < 3
    assert expected_calibration_error(probs, labels) < 0.03
    over_confident = (probs + 0.1).clamp(max=0.999)
    assert dawid_z(over_confident, labels) < -20
    under_confident = (probs - 0.1).clamp(min=0.001)
    assert dawid_z(under_confident, labels) > 20


def test_dawid_z_of_certain_predictions():
    assert dawid_z(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])) == 0.0
    assert dawid_z(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])) == -math.inf
