"""The shipped digits04 classifiers load the way the registry loads them and still work."""

from __future__ import annotations

import json

import torch

from classifiers import sbn
from zoo.digits04 import STORE, digits04_data, load


def test_digits04_sbn_loads_with_its_statistics_and_keeps_bn_predictions():
    data = digits04_data()
    x_test = torch.from_numpy(data.x_test)
    plain, stochastic = load("digits04-bn"), load("digits04-sbn")
    assert not sbn.sbn_layers(plain) and len(sbn.sbn_layers(stochastic)) == 4
    assert all(int(layer.batches_fitted) > 0 for layer in sbn.sbn_layers(stochastic))
    expected = sbn.predict_deterministic(plain, x_test).probs
    torch.testing.assert_close(sbn.predict_deterministic(stochastic, x_test).probs, expected)

    manifest = json.loads((STORE / "digits04-sbn" / "1" / "manifest.json").read_text())
    assert manifest["transform"] == "sbn" and manifest["uncertainty"] == "sbn"
    prediction = sbn.predict(stochastic, x_test, 8, torch.Generator().manual_seed(0))
    accuracy = (prediction.label.numpy() == data.y_test).mean()
    assert accuracy > manifest["metrics"]["accuracy"] - 0.02
    ood = sbn.predict(stochastic, torch.from_numpy(data.x_ood[:200]), 8)
    assert ood.mutual_information.mean() > 3 * prediction.mutual_information.mean()
