"""The shipped SBP digits models: manifests, loading, and the figures they claim."""

from __future__ import annotations

import json

import pytest
import torch

from classifiers import sbp
from classifiers.compress import count_flops, unit_counts
from zoo.data import load_digits_split
from zoo.digits_sbp import STORE, load

NETWORKS = ["digits-lenet5", "digits-mlp"]


def manifest(name: str) -> dict:
    return json.loads((STORE / name / "1" / "manifest.json").read_text())


def held_out_accuracy(model: torch.nn.Module) -> float:
    split = load_digits_split()
    x, y = torch.from_numpy(split.x_test.copy()), torch.from_numpy(split.y_test.copy())
    return (sbp.predict(model, x).label == y).float().mean().item()


@pytest.mark.parametrize("name", NETWORKS)
def test_original_and_compressed_models_load_and_match_their_manifests(name):
    for stored in (name, name + "-sbp"):
        info = manifest(stored)
        assert info["kind"] == "classifier" and info["uncertainty"] == "none"
        assert info["input_shape"] == [1, 8, 8] and info["classes"] == list(range(10))
        model = load(stored)
        assert not sbp.sbp_layers(model)
        assert held_out_accuracy(model) == pytest.approx(info["metrics"]["accuracy"], abs=1e-6)


@pytest.mark.parametrize("name", NETWORKS)
def test_compressed_models_meet_the_pruning_goals(name):
    info = manifest(name + "-sbp")
    original, compressed = load(name), load(name + "-sbp")
    assert info["architecture"] == "classifiers.compress:BlockNet"
    assert info["metrics"]["error_increase"] <= 0.01  # within one point of the original
    assert count_flops(original) / count_flops(compressed) >= 5
    report = info["sbp"]
    assert report["units_before"] == unit_counts(original)
    assert report["widths_after"] == unit_counts(compressed)
    assert all(
        0 < after <= before
        for after, before in zip(report["units_after"], report["units_before"], strict=True)
    )
    assert report["max_abs_diff_vs_sbp_network"] < 1e-5
