"""digits04: a small BatchNorm conv net for digits 0-4; digits 5-9 are out of domain.

Two models ship in the store with the same weights: `digits04-bn` (plain BN, running
statistics) and `digits04-sbn` (converted by classifiers.sbn, with fitted SBN statistics).
Trained by `python -m zoo.train_digits04`.

Example:
    >>> model = load("digits04-sbn")
    >>> data = digits04_data()
    >>> prediction = sbn.predict(model, torch.from_numpy(data.x_test[:4]), samples=32)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score
from torch import nn

from architectures import architecture, build
from classifiers import sbn
from classifiers.common import Prediction
from zoo.data import load_digits_split

IN_DOMAIN_CLASSES = (0, 1, 2, 3, 4)
STORE = Path(__file__).resolve().parent / "store"


@architecture
class ConvClassifier(nn.Module):
    """conv-BN-ReLU x2, 2x2 max-pool, conv-BN-ReLU, linear-BN-ReLU, linear logits.

    Input (N, 1, 8, 8) in [0, 1]; output (N, classes) logits.
    """

    input_shape = (1, 8, 8)  # classifiers.sbn.predict checks inputs against this

    def __init__(self, width: int = 16, hidden: int = 64, classes: int = 5):
        super().__init__()

        def conv_block(fan_in: int, fan_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(fan_in, fan_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(fan_out),
                nn.ReLU(),
            ]

        self.features = nn.Sequential(
            *conv_block(1, width),
            *conv_block(width, 2 * width),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            *conv_block(2 * width, 2 * width),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 16, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Digits04Data(NamedTuple):
    x_train: np.ndarray  # (n, 1, 8, 8) float32, classes 0-4 of the train split
    y_train: np.ndarray  # (n,) int64 in 0..4
    x_test: np.ndarray  # (m, 1, 8, 8) classes 0-4 of the test split (held out)
    y_test: np.ndarray  # (m,)
    x_ood: np.ndarray  # classes 5-9 of BOTH splits: no model here has seen any of them


def digits04_data() -> Digits04Data:
    """The project's digits split, cut into in-domain (0-4) and out-of-domain (5-9)."""
    split = load_digits_split()
    train_in = np.isin(split.y_train, IN_DOMAIN_CLASSES)
    test_in = np.isin(split.y_test, IN_DOMAIN_CLASSES)
    x_ood = np.concatenate([split.x_train[~train_in], split.x_test[~test_in]])
    return Digits04Data(
        split.x_train[train_in],
        split.y_train[train_in],
        split.x_test[test_in],
        split.y_test[test_in],
        x_ood,
    )


def classification_metrics(
    prediction: Prediction, labels: np.ndarray, ood_prediction: Prediction
) -> dict[str, float]:
    """Held-out accuracy and NLL (nats per input), and OOD AUROC by entropy and by MI.

    AUROC treats out-of-domain inputs as positives, scored by their uncertainty: 0.5 is
    chance, 1 perfect separation. A deterministic prediction's MI is 0, AUROC 0.5.
    """
    labels_t = torch.as_tensor(labels)
    probs = prediction.probs.cpu()
    nll = -probs[torch.arange(len(labels_t)), labels_t].clamp_min(1e-12).log().mean()
    is_ood = np.r_[np.zeros(len(labels)), np.ones(len(ood_prediction.probs))]

    def auroc(in_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
        scores = torch.cat([in_scores.cpu(), ood_scores.cpu()]).double().numpy()
        return float(roc_auc_score(is_ood, scores))

    return {
        "accuracy": float((probs.argmax(-1) == labels_t).double().mean()),
        "nll": float(nll),
        "ood_auroc_entropy": auroc(prediction.entropy, ood_prediction.entropy),
        "ood_auroc_mutual_information": auroc(
            prediction.mutual_information, ood_prediction.mutual_information
        ),
    }


def load(name: str, device: str | torch.device = "cpu", store: Path = STORE) -> nn.Module:
    """A digits04 model from the store the way the registry loads it (eval mode).

    With "transform": "sbn" the architecture is converted before the weights (which hold
    the SBN statistics) are loaded.
    """
    folder = store / name / "1"
    manifest = json.loads((folder / "manifest.json").read_text())
    model = build(manifest["architecture"], manifest["config"], None, device)
    if manifest.get("transform") == "sbn":
        sbn.convert(model)
    model.load_state_dict(load_file(str(folder / manifest["weights"]), device=str(device)))
    return model.to(device).eval()
