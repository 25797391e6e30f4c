"""Train the digits SBP zoo: two originals and their SBP-compressed versions.

For each network (DigitsLeNet5 20-50-800-500, DigitsMLP 64-500-300-10): pretrain on the
train part of zoo.data.load_digits_split, fine-tune with SBP layers (classifiers.sbp),
compress into a plain classifiers.compress:BlockNet, check that it reproduces the SBP
network's deterministic outputs, measure both on the held-out part and time them on the
CPU, and write zoo/store/digits-<net>/1 and zoo/store/digits-<net>-sbp/1.

Run (about three minutes on two shared cores):
    python -m zoo.train_sbp                 # both networks
    python -m zoo.train_sbp --only lenet5   # one of them
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from architectures import architecture_name, save_weights
from classifiers import sbp
from classifiers.compress import (
    BlockNet,
    count_flops,
    count_params,
    measure_speedup,
    unit_counts,
)
from zoo.data import load_digits_split
from zoo.digits_sbp import CLASSES, INPUT_SHAPE, STORE, DigitsLeNet5, DigitsMLP

COMMAND = "python -m zoo.train_sbp"
SPEED_THREADS = 1  # timings on one thread: the two shared cores make two-thread runs noisy


@dataclass
class Recipe:
    name: str  # store name of the original; the compressed one adds "-sbp"
    description: str
    pretrain_epochs: int = 30
    pretrain_batch_size: int = 64
    pretrain_lr: float = 1e-3
    kl_weight: float = 1.0  # loss N * mean(CE) + kl_weight * KL, N = 1347 here
    sbp_epochs: int = 60
    sbp_batch_size: int = 32  # small batches: SBP needs steps more than epochs
    sbp_lr: float = 1e-3
    sbp_lr_factor: float = 10.0  # mu and log sigma learn 10x faster, as in the thesis
    seed: int = 0


RECIPES = {
    "lenet5": (
        DigitsLeNet5,
        Recipe("digits-lenet5", "digits LeNet-5-like conv net, units 20-50-800-500"),
    ),
    "mlp": (DigitsMLP, Recipe("digits-mlp", "digits MLP 64-500-300-10")),
}


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (sbp.predict(model, x).label == y).float().mean().item()


def write_model(name: str, model: BlockNet, manifest: dict[str, Any]) -> Path:
    folder = STORE / name / "1"
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder / "weights.safetensors")
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def common_manifest(architecture: str, config: dict[str, Any], description: str) -> dict:
    return {
        "kind": "classifier",
        "format": "zoo",
        "architecture": architecture,
        "config": config,
        "weights": "weights.safetensors",
        "description": description,
        "classes": CLASSES,
        "input_shape": INPUT_SHAPE,
        "value_range": [0.0, 1.0],
        "uncertainty": "none",
    }


def train(key: str, log=print) -> dict[str, Any]:
    make, recipe = RECIPES[key]
    split = load_digits_split()
    x_train, y_train = torch.from_numpy(split.x_train.copy()), torch.from_numpy(split.y_train)
    x_test, y_test = torch.from_numpy(split.x_test.copy()), torch.from_numpy(split.y_test)

    torch.manual_seed(recipe.seed)
    original = make()
    start = time.perf_counter()
    sbp.fit(
        original,
        x_train,
        y_train,
        epochs=recipe.pretrain_epochs,
        batch_size=recipe.pretrain_batch_size,
        lr=recipe.pretrain_lr,
        seed=recipe.seed,
    )
    original.eval()
    pretrain_seconds = time.perf_counter() - start
    original_accuracy = accuracy(original, x_test, y_test)
    log(f"{recipe.name}: pretrained in {pretrain_seconds:.0f}s, accuracy {original_accuracy:.4f}")

    start = time.perf_counter()
    noisy = sbp.train_sbp(
        original,
        x_train,
        y_train,
        kl_weight=recipe.kl_weight,
        epochs=recipe.sbp_epochs,
        batch_size=recipe.sbp_batch_size,
        lr=recipe.sbp_lr,
        sbp_lr_factor=recipe.sbp_lr_factor,
        seed=recipe.seed,
    )
    sbp_seconds = time.perf_counter() - start
    small, report = sbp.compress(noisy)
    with torch.no_grad():
        max_diff = (small(x_test) - noisy(x_test)).abs().max().item()
    small_accuracy = accuracy(small, x_test, y_test)
    log(
        f"{recipe.name}: SBP in {sbp_seconds:.0f}s, units {report.units_before} -> "
        f"{report.units_after}, accuracy {small_accuracy:.4f}, FLOPs "
        f"{report.flops_reduction:.1f}x fewer, |compressed - SBP| <= {max_diff:.1e}"
    )
    if max_diff > 1e-4:
        raise RuntimeError(f"compressed network differs from the SBP network by {max_diff}")

    threads = torch.get_num_threads()
    torch.set_num_threads(SPEED_THREADS)
    try:
        speed = measure_speedup(original, small, tuple(INPUT_SHAPE), (1, 256))
    finally:
        torch.set_num_threads(threads)
    log(
        f"{recipe.name}: CPU speed-up {speed['1']['speedup']:.2f}x at batch 1, "
        f"{speed['256']['speedup']:.2f}x at batch 256"
    )

    training = {"command": COMMAND, "data": "zoo.data.load_digits_split train part"}
    original_manifest = common_manifest(
        architecture_name(original), original.config, recipe.description
    )
    original_manifest.update(
        training={
            **training,
            "seed": recipe.seed,
            "epochs": recipe.pretrain_epochs,
            "batch_size": recipe.pretrain_batch_size,
            "lr": recipe.pretrain_lr,
        },
        compressed=recipe.name + "-sbp",
        metrics={
            "accuracy": original_accuracy,
            "error": 1 - original_accuracy,
            "params": count_params(original),
            "flops": count_flops(original),
            "units": unit_counts(original),
            "evaluation": "held-out test split (450 images)",
        },
    )
    units = "-".join(map(str, report.units_after))
    sbp_manifest = common_manifest(
        "classifiers.compress:BlockNet",
        small.block_config,
        f"{recipe.description} pruned by Structured Bayesian Pruning to {units} units",
    )
    sbp_manifest.update(
        original=recipe.name,
        training={**training, "recipe": asdict(recipe), "seconds": round(sbp_seconds, 1)},
        sbp={
            **report.to_dict(),
            "snr_threshold": sbp.SNR_THRESHOLD,
            "log_theta_range": [sbp.LOG_THETA_MIN, sbp.LOG_THETA_MAX],
            "max_abs_diff_vs_sbp_network": max_diff,
            "speed": {"threads": SPEED_THREADS, "batch_sizes": speed},
        },
        metrics={
            "accuracy": small_accuracy,
            "error": 1 - small_accuracy,
            "original_error": 1 - original_accuracy,
            "error_increase": original_accuracy - small_accuracy,
            "params": report.params_after,
            "params_reduction": report.params_reduction,
            "flops": report.flops_after,
            "flops_reduction": report.flops_reduction,
            "units_before": report.units_before,
            "units_after": report.units_after,
            "speedup_batch_1": speed["1"]["speedup"],
            "speedup_batch_256": speed["256"]["speedup"],
            "evaluation": "held-out test split (450 images); speed on CPU, one thread",
        },
    )
    write_model(recipe.name, original, original_manifest)
    write_model(recipe.name + "-sbp", small, sbp_manifest)
    return sbp_manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(RECIPES), help="train one network")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: these nets are too small to gain from more, and "
        "two threads on busy shared cores run many times slower)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for key in [args.only] if args.only else list(RECIPES):
        train(key)


if __name__ == "__main__":
    main()
