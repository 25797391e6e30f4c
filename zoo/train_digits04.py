"""Train the digits04 classifier and write zoo/store/digits04-bn and digits04-sbn.

    .venv/bin/python -m zoo.train_digits04      # seeded; about 10 s on one CPU thread

One network is trained on digits 0-4 (train split) with plain BatchNorm. digits04-bn is
that network as is; digits04-sbn is the same weights after classifiers.sbn.convert and
fit_statistics over shuffled training batches of the training batch size. Manifest
metrics come from the held-out test split (0-4) and every 5-9 image (out of domain).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from architectures import architecture_name, save_weights
from classifiers import sbn
from zoo.digits04 import (
    IN_DOMAIN_CLASSES,
    STORE,
    ConvClassifier,
    classification_metrics,
    digits04_data,
)

SEED = 0
CONFIG = {"width": 16, "hidden": 64, "classes": len(IN_DOMAIN_CLASSES)}
BATCH_SIZE = 32  # also the batch size of the SBN fit: the statistics' spread depends on it
EPOCHS = 40
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
FIT_EPOCHS = 3  # passes over the training set for the SBN statistics (momentum 0.1)
SAMPLES = 32  # K for the manifest metrics and the suggested default


def shuffled_batches(x: torch.Tensor, epochs: int, generator: torch.Generator):
    """Full training-size batches (the last partial batch of each epoch is dropped)."""
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - BATCH_SIZE + 1, BATCH_SIZE):
            yield order[start : start + BATCH_SIZE]


def train(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> ConvClassifier:
    model = ConvClassifier(**CONFIG)
    optimizer = torch.optim.Adam(model.parameters(), LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps = EPOCHS * (len(x) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, total_steps=steps)
    model.train()
    for rows in shuffled_batches(x, EPOCHS, generator):
        loss = F.cross_entropy(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def write_model(name: str, model: torch.nn.Module, manifest: dict) -> Path:
    folder = STORE / name / "1"
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder / "weights.safetensors")
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def main() -> None:
    # One thread: on a small shared machine extra threads mostly wait on each other (a
    # training step took 6x longer with 2 threads than with 1 under load).
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    data = digits04_data()
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test, x_ood = torch.from_numpy(data.x_test), torch.from_numpy(data.x_ood)

    started = time.perf_counter()
    model = train(x_train, y_train, generator)
    bn_metrics = classification_metrics(
        sbn.predict_deterministic(model, x_test),
        data.y_test,
        sbn.predict_deterministic(model, x_ood),
    )

    sbn_model = sbn.convert(copy.deepcopy(model))
    fit_rows = shuffled_batches(x_train, FIT_EPOCHS, generator)
    sbn.fit_statistics(sbn_model, (x_train[rows] for rows in fit_rows), momentum=0.1)
    # the same draws as benchmarks/sbn.py, so the manifest and the benchmark table agree
    sbn_metrics = classification_metrics(
        sbn.predict(sbn_model, x_test, SAMPLES, torch.Generator().manual_seed(1)),
        data.y_test,
        sbn.predict(sbn_model, x_ood, SAMPLES, torch.Generator().manual_seed(2)),
    )
    seconds = time.perf_counter() - started

    common = {
        "kind": "classifier",
        "format": "zoo",
        "architecture": architecture_name(ConvClassifier),
        "config": CONFIG,
        "weights": "weights.safetensors",
        "classes": list(IN_DOMAIN_CLASSES),
        "input_shape": list(ConvClassifier.input_shape),
        "value_range": [0.0, 1.0],
        "training": {
            "command": "python -m zoo.train_digits04",
            "data": "zoo.data.load_digits_split train part, classes 0-4",
            "seed": SEED,
            "batch_size": BATCH_SIZE,
            "epochs": EPOCHS,
        },
        "evaluation": "held-out test split classes 0-4; out of domain: classes 5-9 of both "
        "splits (never seen in training)",
    }
    write_model(
        "digits04-bn",
        model,
        {
            **common,
            "description": "digits 0-4 conv net with BatchNorm (deterministic; 5-9 unseen)",
            "uncertainty": "none",
            "metrics": bn_metrics,
        },
    )
    write_model(
        "digits04-sbn",
        sbn_model,
        {
            **common,
            "description": "digits 0-4 conv net with Stochastic BatchNorm (uncertainty)",
            "uncertainty": "sbn",
            "transform": "sbn",
            "default_samples": SAMPLES,
            "max_samples": sbn.MAX_SAMPLES,
            "sbn_fit": {"batch_size": BATCH_SIZE, "momentum": 0.1, "epochs": FIT_EPOCHS},
            "metrics": {**sbn_metrics, "samples": SAMPLES},
        },
    )
    print(f"trained and fitted in {seconds:.1f}s")
    print("digits04-bn ", json.dumps(bn_metrics))
    print("digits04-sbn", json.dumps(sbn_metrics))


if __name__ == "__main__":
    main()
