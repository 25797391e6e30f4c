"""sbn-fit for an uploaded classifier: Stochastic Batch Normalization on a lifted network.

The job lifts the user's torch.export program (classifiers.lift), replaces its BatchNorm
layers by SBN layers (classifiers.sbn.convert), fits the four smoothed statistics on the
user's training inputs, and evaluates plain BN against SBN on held-out data: accuracy,
NLL and, when out-of-domain inputs are given, OOD AUROC by entropy (both) and by mutual
information (SBN). The result is a zoo-format model that classifiers.sbn.predict serves
with entropy and mutual information:

    manifest.json        {"format": "zoo", "architecture": "classifiers.lifted:LiftedNet",
                          "config": ..., "weights": "weights.safetensors",
                          "transform": "sbn", "uncertainty": "sbn", ...}
    weights.safetensors  the LiftedNet state dict with the SBN buffers

Loading it: architectures.build(architecture, config), classifiers.sbn.convert, then
load_state_dict(strict=True), as the registry does for "transform": "sbn".

The fit batches are those of the synchronous sbn-fit (service.classifiers): `epochs`
passes, each a fresh permutation from a generator seeded with `seed`, full batches of
`batch_size` rows (the training batch size: the spread of the statistics depends on it).

Example:
    check_sbn_fit(program, spec, train, held_out, settings)   # before queueing the job
    result = run_sbn_fit(program, spec, train, held_out, ood, SbnFitSettings(seed=0))
    result.write(folder); result.report["sbn"]["nll"]
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from architectures import architecture_name, save_weights
from classifiers import sbn
from classifiers.job_common import (
    ClassifierSpec,
    Progress,
    ShouldStop,
    accuracy_and_nll,
    check_outputs,
    check_stop,
    ood_auroc,
    predict_in_chunks,
    report_progress,
)
from classifiers.lift import UnsupportedGraph, lift
from classifiers.lifted import LiftedNet
from classifiers.upload_data import BadData, Dataset, require_labels, split_held_out

MIN_FIT_BATCHES = 8  # the spread of the statistics is estimated across batches: need several
MAX_EPOCHS = 100
FIT_SHARE = 0.7  # of the job's progress: the rest is the evaluation


@dataclass(frozen=True)
class SbnFitSettings:
    batch_size: int = 32  # the network's training batch size
    epochs: int = 3  # passes over the training inputs
    momentum: float = 0.1  # smoothing of the statistics, as classifiers.sbn and the zoo
    seed: int = 0  # batches, the held-out split and the evaluation draws
    samples: int = 32  # K: the evaluation's and the served model's default
    held_out_fraction: float = 0.2  # when no held-out set is given

    def check(self, train_rows: int) -> None:
        """BadData naming the setting that cannot work with `train_rows` inputs."""
        if not 2 <= self.batch_size or train_rows < MIN_FIT_BATCHES * self.batch_size:
            raise BadData(
                "batch_size" if self.batch_size < 2 else "train",
                f"need batch_size >= 2 and at least {MIN_FIT_BATCHES} batches of training "
                f"inputs ({MIN_FIT_BATCHES} x {self.batch_size}), got {train_rows} inputs",
            )
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise BadData("epochs", f"must be between 1 and {MAX_EPOCHS}, got {self.epochs}")
        if not 0.0 < self.momentum <= 1.0:
            raise BadData("momentum", f"must be in (0, 1], got {self.momentum}")
        if not 1 <= self.samples <= sbn.MAX_SAMPLES:
            raise BadData("samples", f"must be between 1 and {sbn.MAX_SAMPLES}")
        if not 0 <= self.seed < 2**63:
            raise BadData("seed", "must be in [0, 2^63)")


@dataclass
class SbnFitResult:
    model: nn.Module  # the SBN-converted LiftedNet with fitted statistics, eval mode
    report: dict[str, Any]  # {"plain": metrics, "sbn": metrics, ...}
    manifest: dict[str, Any]  # zoo-format manifest; add "description", "original" etc.

    def write(self, folder: str | Path) -> dict[str, Path]:
        """manifest.json and weights.safetensors in `folder`; returns the paths by name."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"manifest.json": folder / "manifest.json",
                 "weights.safetensors": folder / "weights.safetensors"}  # fmt: skip
        save_weights(self.model, paths["weights.safetensors"])
        paths["manifest.json"].write_text(json.dumps(self.manifest, indent=2) + "\n")
        return paths


def prepare_sbn_fit(program: torch.export.ExportedProgram, spec: ClassifierSpec) -> LiftedNet:
    """Lift the program and check that SBN applies; UnsupportedGraph otherwise."""
    net = lift(program, spec.input_shape, spec.value_range)
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        raise UnsupportedGraph(
            "graph", "the program has no batch normalisation: SBN needs a batch-normalised network"
        )
    check_outputs(net, spec)
    return net


def fit_sbn(
    net: nn.Module,
    x: torch.Tensor,
    settings: SbnFitSettings,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> nn.Module:
    """A converted copy of `net` with SBN statistics fitted on training inputs `x`."""
    model = sbn.convert(copy.deepcopy(net))
    generator = torch.Generator().manual_seed(settings.seed)
    size = settings.batch_size
    total = settings.epochs * (len(x) // size)
    every = max(1, total // 100)

    def batches():
        done = 0
        for _ in range(settings.epochs):
            order = torch.randperm(len(x), generator=generator)
            for first in range(0, len(x) - size + 1, size):
                check_stop(should_stop)
                yield x[order[first : first + size]]
                done += 1
                if done % every == 0 or done == total:
                    report_progress(progress, FIT_SHARE * done / total, phase="sbn-fit",
                                    batch=done, batches=total)  # fmt: skip

    sbn.fit_statistics(model, batches(), momentum=settings.momentum)
    return model.eval()


def evaluate_sbn(
    plain: nn.Module,
    model: nn.Module,
    held_out: Dataset,
    ood: Dataset | None,
    samples: int,
    seed: int,
) -> dict[str, Any]:
    """Held-out accuracy and NLL of plain BN and SBN; OOD AUROC when `ood` is given.

    SBN draws come from generators seeded seed + 1 (held out) and seed + 2 (OOD).
    """
    plain_in = predict_in_chunks(plain, held_out.x)
    sbn_in = sbn.predict(model, held_out.x, samples, torch.Generator().manual_seed(seed + 1))
    report: dict[str, Any] = {
        "plain": accuracy_and_nll(plain_in, held_out.y),
        "sbn": accuracy_and_nll(sbn_in, held_out.y),
        "samples": samples,
        "held_out": len(held_out),
    }
    if ood is not None:
        plain_ood = predict_in_chunks(plain, ood.x)
        sbn_ood = sbn.predict(model, ood.x, samples, torch.Generator().manual_seed(seed + 2))
        report["plain"]["ood_auroc_entropy"] = ood_auroc(plain_in.entropy, plain_ood.entropy)
        report["sbn"]["ood_auroc_entropy"] = ood_auroc(sbn_in.entropy, sbn_ood.entropy)
        report["sbn"]["ood_auroc_mutual_information"] = ood_auroc(
            sbn_in.mutual_information, sbn_ood.mutual_information
        )
        report["ood"] = len(ood)
    return report


def check_sbn_fit(
    program: torch.export.ExportedProgram,
    spec: ClassifierSpec,
    train: Dataset,
    held_out: Dataset | None = None,
    settings: SbnFitSettings | None = None,
) -> tuple[LiftedNet, Dataset, Dataset]:
    """Every check of the job, none of its work (the service calls it before queueing).

    Returns the lifted network and the (train, held out) sets the job will use: without
    `held_out`, a seeded `settings.held_out_fraction` of `train`. Raises UnsupportedGraph
    or BadData.
    """
    settings = settings or SbnFitSettings()
    net = prepare_sbn_fit(program, spec)
    require_labels(train, "train")
    if held_out is None:
        train, held_out = split_held_out(train, settings.held_out_fraction, settings.seed)
    require_labels(held_out, "held_out")
    settings.check(len(train))
    return net, train, held_out


def run_sbn_fit(
    program: torch.export.ExportedProgram,
    spec: ClassifierSpec,
    train: Dataset,
    held_out: Dataset | None = None,
    ood: Dataset | None = None,
    settings: SbnFitSettings | None = None,
    *,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> SbnFitResult:
    """The whole sbn-fit job (see the module docstring).

    Raises what `check_sbn_fit` raises before any work, JobCancelled when should_stop()
    says so (nothing to resume: the fit takes seconds; start it again).
    """
    settings = settings or SbnFitSettings()
    net, train, held_out = check_sbn_fit(program, spec, train, held_out, settings)
    report_progress(progress, 0.0, phase="lifted")
    model = fit_sbn(net, train.x, settings, progress, should_stop)
    check_stop(should_stop)
    report = evaluate_sbn(net, model, held_out, ood, settings.samples, settings.seed)
    report_progress(progress, 1.0, phase="evaluated")
    return SbnFitResult(model, report, _manifest(net, spec, settings, report, len(train)))


def _manifest(
    net: LiftedNet,
    spec: ClassifierSpec,
    settings: SbnFitSettings,
    report: dict[str, Any],
    train_rows: int,
) -> dict[str, Any]:
    fit = {key: value for key, value in asdict(settings).items() if key != "samples"}
    return {
        **spec.manifest_fields(),
        "format": "zoo",
        "architecture": architecture_name(LiftedNet),
        "config": net.config,
        "weights": "weights.safetensors",
        "uncertainty": "sbn",
        "transform": "sbn",
        "default_samples": settings.samples,
        "max_samples": sbn.MAX_SAMPLES,
        "sbn_fit": {**fit, "inputs": train_rows},
        "metrics": {**report["sbn"], "samples": settings.samples, "plain": report["plain"]},
        "evaluation": f"held-out inputs ({report['held_out']})"
        + (f"; out of domain: {report['ood']} uploaded inputs" if "ood" in report else ""),
    }
