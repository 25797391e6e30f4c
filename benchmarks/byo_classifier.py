"""Bring-your-own classifiers: sbn-fit and sbp-prune on uploaded torch.export programs.

A user's LeNet-5-like network with batch norm (conv 20 - BN - ReLU - max-pool, conv 50 -
BN - ReLU, linear 500 - BN - ReLU - dropout, linear), trained here for a few seconds
(seeded) and exported with torch.export, goes through the two jobs exactly as the service
runs them: lifted from its ATen graph (classifiers.lift), then

- sbn-fit (classifiers.sbn_job): held-out accuracy and NLL of plain BN vs SBN, OOD AUROC
  by entropy and mutual information; on the 10-class network (out of domain: the
  held-out digits inverted, 1 - x) and on a 5-class one trained on digits 0-4 (out of
  domain: every 5-9 image, the protocol of the zoo's digits04 models);
- sbp-prune (classifiers.sbp_job) with two recipes: "fast" (10 epochs, noise parameters
  at 100x the learning rate) and "zoo" (the zoo's digits recipe: 60 epochs at 10x):
  units per layer, parameters, FLOPs, held-out error before and after, CPU speed-up at
  batch 1 and 256 (one torch thread, timed alternately, medians) of the block network
  before vs after (same kernels: pruning alone) and of the uploaded program vs the
  exported compressed program (what the service runs).

Goals (as for the zoo; the thesis' LeNet-5: error +0.06 points, 5.41x CPU): sbp-prune
keeps held-out error within 1 point, cuts FLOPs at least 5x and runs at least 2x faster
at batch 256; sbn-fit keeps accuracy and NLL no worse than the plain network.

Run (about three minutes on two shared cores):
    .venv/bin/python -m benchmarks.byo_classifier     # docs/RESULTS.md, "byo-classifier"
    .venv/bin/python -m benchmarks.byo_classifier --recipes fast --no-write --json /tmp/byo.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.report import machine, markdown_table, write_section
from classifiers.job_common import ClassifierSpec
from classifiers.sbn_job import SbnFitSettings, run_sbn_fit
from classifiers.sbp_job import run_sbp_prune
from classifiers.sbp_resumable import PruneSettings
from classifiers.upload_data import Dataset
from zoo.data import load_digits_split

COMMAND = ".venv/bin/python -m benchmarks.byo_classifier"
PRETRAIN_EPOCHS = 10
RECIPES = {
    "fast": PruneSettings(epochs=10, sbp_lr_factor=100.0),
    "zoo": PruneSettings(epochs=60, sbp_lr_factor=10.0),
}
BYO_READING = """Reading: the held-out split has 450 digits, so one image is 0.22 points of
accuracy. On the 10-digit network SBN's stochastic statistics cost a few borderline images here
(4 with the job's defaults; other seeds and more epochs cost 2 to 4), while an earlier
run on another CPU, whose kernels round the pretrained weights differently, gained 2
(98.0 -> 98.4%): the goal holds on digits 0-4 and not reliably on 10 digits. SBN's use
is the uncertainty of each prediction (mutual information), which a plain network
lacks; where accuracy matters more, serve the plain upload beside it."""

SBN_SETTINGS = SbnFitSettings(batch_size=32, epochs=3, seed=0, samples=32)


def lenet5_bn(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 20, 3, padding=1), nn.BatchNorm2d(20), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 3, padding=1), nn.BatchNorm2d(50), nn.ReLU(), nn.Flatten(),
        nn.Linear(800, 500), nn.BatchNorm1d(500), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(500, classes),
    )  # fmt: skip


def pretrain(make: Callable[[], nn.Module], data: Dataset, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model, generator = make(), torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(PRETRAIN_EPOCHS):
        order = torch.randperm(len(data), generator=generator)
        for first in range(0, len(data) - 31, 32):
            rows = order[first : first + 32]
            loss = F.cross_entropy(model(data.x[rows]), data.y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def export(model: nn.Module) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch")
    return torch.export.export(model, (torch.rand(4, 1, 8, 8),), dynamic_shapes=({0: batch},))


def digits(classes: tuple[int, ...]) -> tuple[Dataset, Dataset, Dataset]:
    """(train, held out, out of domain): `classes` of each split; the other classes of
    both splits are out of domain (for all ten: the held-out digits inverted)."""
    split = load_digits_split()

    def part(x: np.ndarray, y: np.ndarray, keep: np.ndarray) -> Dataset:
        return Dataset(torch.from_numpy(x[keep].copy()), torch.from_numpy(y[keep].copy()))

    train_in, test_in = np.isin(split.y_train, classes), np.isin(split.y_test, classes)
    train, held_out = (part(split.x_train, split.y_train, train_in),
                       part(split.x_test, split.y_test, test_in))  # fmt: skip
    if train_in.all():
        return train, held_out, Dataset(1.0 - held_out.x, None)
    ood = np.concatenate([split.x_train[~train_in], split.x_test[~test_in]])
    return train, held_out, Dataset(torch.from_numpy(ood), None)


def sbn_row(label: str, classes: tuple[int, ...], log) -> tuple[list[Any], dict]:
    train, held_out, ood = digits(classes)
    program = export(pretrain(lambda: lenet5_bn(len(classes)), train))
    spec = ClassifierSpec((1, 8, 8), list(classes))
    started = time.perf_counter()
    report = run_sbn_fit(program, spec, train, held_out, ood, SBN_SETTINGS).report
    seconds = time.perf_counter() - started
    log(f"sbn-fit {label}: {json.dumps(report)} in {seconds:.1f}s")
    plain, sbn = report["plain"], report["sbn"]
    return [
        label,
        f"{100 * plain['accuracy']:.2f} / {100 * sbn['accuracy']:.2f}",
        f"{plain['nll']:.4f} / {sbn['nll']:.4f}",
        f"{plain['ood_auroc_entropy']:.3f} / {sbn['ood_auroc_entropy']:.3f}",
        f"{sbn['ood_auroc_mutual_information']:.3f}",
        f"{seconds:.1f}",
    ], report


def sbp_row(recipe: str, program, train: Dataset, held_out: Dataset, log) -> tuple[list, dict]:
    spec = ClassifierSpec((1, 8, 8), list(range(10)))
    started = time.perf_counter()
    result = run_sbp_prune(program, spec, train, held_out, RECIPES[recipe])
    seconds = time.perf_counter() - started
    metrics, speed = result.report["metrics"], result.report["sbp"]["speed"]
    log(f"sbp-prune {recipe}: {json.dumps(metrics)} in {seconds:.1f}s")
    programs = speed["programs"]
    return [
        recipe,
        f"{100 * metrics['original_error']:.2f} -> {100 * metrics['error']:.2f}",
        f"{100 * metrics['error_increase']:+.2f}",
        "-".join(map(str, metrics["units_before"])) + " -> "
        + "-".join(map(str, metrics["units_after"])),
        f"{metrics['params_reduction']:.1f}x",
        f"{metrics['flops_reduction']:.1f}x",
        f"{metrics['speedup_batch_1']:.2f}x / {metrics['speedup_batch_256']:.2f}x",
        f"{programs['1']['speedup']:.2f}x / {programs['256']['speedup']:.2f}x",
        f"{seconds:.0f}",
    ], result.report  # fmt: skip


def verdicts(reports: dict[str, Any]) -> str:
    """The goals, checked on each network and recipe of this run."""
    lines = []
    for key, report in reports.items():
        if key.startswith("sbn-fit"):
            plain, sbn = report["plain"], report["sbn"]
            kept = sbn["accuracy"] >= plain["accuracy"] and sbn["nll"] <= plain["nll"]
            lines.append(
                f"- {key}: accuracy {100 * plain['accuracy']:.2f} -> "
                f"{100 * sbn['accuracy']:.2f}%, NLL {plain['nll']:.4f} -> {sbn['nll']:.4f}: "
                f"**{'met' if kept else 'not met'}**"
            )
        elif key.startswith("sbp-prune"):
            metrics = report["metrics"]
            programs = report["sbp"]["speed"]["programs"]
            met = (metrics["error_increase"] <= 0.01 and metrics["flops_reduction"] >= 5
                   and programs["256"]["speedup"] >= 2)  # fmt: skip
            lines.append(
                f"- {key}: error {100 * metrics['error_increase']:+.2f} points, FLOPs "
                f"{metrics['flops_reduction']:.1f}x, programs at batch 256 "
                f"{programs['256']['speedup']:.2f}x: **{'met' if met else 'not met'}**"
            )
    return "Goals in this run:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["fast", "zoo"])
    parser.add_argument("--json", help="also write every report to this JSON file")
    parser.add_argument("--no-write", dest="write", action="store_false",
                        help="print only; do not write docs/RESULTS.md")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small nets on two busy shared cores: one thread is fastest
    reports: dict[str, Any] = {"machine": machine(), "command": COMMAND}
    sbn_rows = []
    for label, classes in (("10 digits", tuple(range(10))), ("digits 0-4", tuple(range(5)))):
        row, reports[f"sbn-fit {label}"] = sbn_row(label, classes, print)
        sbn_rows.append(row)
    train, held_out, _ = digits(tuple(range(10)))
    program = export(pretrain(lambda: lenet5_bn(10), train))
    sbp_rows = []
    for recipe in args.recipes:
        row, reports[f"sbp-prune {recipe}"] = sbp_row(recipe, program, train, held_out, print)
        sbp_rows.append(row)
    text = "\n\n".join([
        "## Bring-your-own classifiers: sbn-fit and sbp-prune on an uploaded program",
        f"Command: `{COMMAND}` ({machine()}). A LeNet-5-like network with batch norm, "
        "trained on the digits split for a few seconds and exported with torch.export, "
        "through the jobs as the service runs them. Goals (the zoo's; the thesis' LeNet-5: "
        "error +0.06 points, 5.41x CPU): sbp-prune keeps held-out error within 1 point, "
        "cuts FLOPs at least 5x and runs at least 2x faster at batch 256; sbn-fit keeps "
        "accuracy and NLL no worse than the plain network.",
        markdown_table(
            ["Network", "Accuracy % plain / SBN", "NLL plain / SBN",
             "OOD AUROC entropy plain / SBN", "OOD AUROC MI (SBN)", "Seconds"],
            sbn_rows),
        markdown_table(
            ["Recipe", "Error %", "Change (points)", "Units per layer", "Params", "FLOPs",
             "CPU speed-up b1 / b256 (block nets)", "CPU speed-up b1 / b256 (programs)",
             "Seconds"],
            sbp_rows),
        verdicts(reports),
        BYO_READING,
    ])  # fmt: skip
    print(text, flush=True)
    if args.write:
        write_section("RESULTS.md", "byo-classifier", text)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(reports, file, indent=1)


if __name__ == "__main__":
    main()
