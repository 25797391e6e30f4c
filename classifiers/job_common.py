"""What the sbn-fit and sbp-prune jobs share: callbacks, cancellation, metrics, manifests.

A job reports progress through `progress(fraction, info)` (fraction in [0, 1] of the
whole job, info a small JSON-able dict) and polls `should_stop()` between steps; when it
returns True the job raises `JobCancelled` (carrying the last training checkpoint when
there is one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from classifiers.common import Prediction, deterministic
from classifiers.lift import UnsupportedGraph

Progress = Callable[[float, dict[str, Any]], None]
ShouldStop = Callable[[], bool]


class JobCancelled(Exception):
    """should_stop() said so; `checkpoint` (sbp-prune) resumes the work done so far."""

    def __init__(self, message: str = "cancelled", checkpoint: Any = None):
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class ClassifierSpec:
    """What the uploaded classifier's manifest says about its inputs and outputs."""

    input_shape: tuple[int, ...]
    classes: list[Any]  # the labels of outputs 0..C-1
    value_range: tuple[float, float] = (0.0, 1.0)

    def manifest_fields(self) -> dict[str, Any]:
        return {
            "kind": "classifier",
            "classes": list(self.classes),
            "input_shape": list(self.input_shape),
            "value_range": list(self.value_range),
        }


def report_progress(progress: Progress | None, fraction: float, **info: Any) -> None:
    if progress is not None:
        progress(min(1.0, max(0.0, fraction)), info)


def check_stop(should_stop: ShouldStop | None, checkpoint: Any = None) -> None:
    if should_stop is not None and should_stop():
        raise JobCancelled("cancelled", checkpoint)


def check_outputs(net: torch.nn.Module, spec: ClassifierSpec) -> None:
    """UnsupportedGraph unless the network returns one score per manifest class."""
    with torch.no_grad():
        scores = net.eval()(torch.zeros(2, *spec.input_shape)).shape[1]
    if scores != len(spec.classes):
        raise UnsupportedGraph(
            "output",
            f"the program returns {scores} scores per input; the manifest lists "
            f"{len(spec.classes)} classes",
        )


@torch.no_grad()
def predict_in_chunks(model: torch.nn.Module, x: torch.Tensor, rows: int = 4096) -> Prediction:
    """One deterministic eval-mode pass (softmax of the outputs), `rows` inputs at a time."""
    model.eval()
    return deterministic(torch.cat([model(chunk).float().softmax(-1) for chunk in x.split(rows)]))


def accuracy_and_nll(prediction: Prediction, labels: torch.Tensor) -> dict[str, float]:
    """Held-out accuracy and NLL (nats per input) of a prediction."""
    probs, labels = prediction.probs.cpu().double(), labels.cpu()
    chosen = probs[torch.arange(len(labels)), labels].clamp_min(1e-12)
    return {
        "accuracy": float((probs.argmax(-1) == labels).double().mean()),
        "nll": float(-chosen.log().mean()),
    }


def ood_auroc(in_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
    """AUROC of telling out-of-domain inputs (positives) apart by their uncertainty score:
    0.5 is chance, 1 perfect separation."""
    scores = torch.cat([in_scores.cpu(), ood_scores.cpu()]).double().numpy()
    is_ood = np.r_[np.zeros(len(in_scores)), np.ones(len(ood_scores))]
    return float(roc_auc_score(is_ood, scores))
