"""sbp-prune for an uploaded classifier: Structured Bayesian Pruning, then a smaller program.

The job lifts the user's torch.export program into a `classifiers.compress.BlockNet`
(classifiers.lift, classifiers.block_rewrite), puts an SBP noise layer on every conv
output channel and dense input feature (classifiers.sbp.add_sbp), fine-tunes on the
user's data (classifiers.sbp_resumable: seeded, checkpointed, cancellable), slices the
pruned units out (classifiers.compress.compress: E[theta] folded into the weights,
constant outputs of removed channels folded into the next layer) and exports the
physically smaller network as a torch.export program with a dynamic batch dimension.
The report has what the zoo's SBP models report: units per layer before and after,
parameters, FLOPs, held-out accuracy before and after and, when asked, the measured CPU
speed-up at batch 1 and 256.

Result files (`PruneResult.write(folder)`):

    manifest.json   {"kind": "classifier", "format": "torch.export", "file":
                     "classifier.pt2", "uncertainty": "none", "sbp": {...},
                     "metrics": {...}, ...}
    classifier.pt2  torch.export.save of the compressed network

Example:
    check_sbp_prune(program, spec, train, held_out, settings)   # before queueing the job
    result = run_sbp_prune(program, spec, train, held_out, PruneSettings(seed=0),
                           on_checkpoint=lambda c: c.save(folder))
    result.write(out); result.report["metrics"]["flops_reduction"]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from classifiers import sbp
from classifiers.block_rewrite import to_block_net
from classifiers.compress import BlockNet, measure_latencies, measure_speedup
from classifiers.job_common import (
    ClassifierSpec,
    Progress,
    ShouldStop,
    accuracy_and_nll,
    check_outputs,
    check_stop,
    predict_in_chunks,
    report_progress,
)
from classifiers.lift import lift
from classifiers.program_export import (
    export_classifier,
    load_program_bytes,
    program_bytes,
    program_ops,
)
from classifiers.sbp_resumable import Checkpoint, PruneSettings, train_resumable
from classifiers.upload_data import BadData, Dataset, require_labels, split_held_out

TRAIN_SHARE = 0.9  # of the job's progress; compression, export and timing share the rest
SPEED_BATCHES = (1, 256)
SPEED_THREADS = 1  # as the zoo: two-thread timings on shared cores are noisy
MAX_EXPORT_DIFF = 1e-4  # |exported program - compressed network|, relative to outputs
PROGRAM_FILE = "classifier.pt2"


@dataclass
class PruneResult:
    compressed: BlockNet  # the physically smaller network, eval mode
    program: ExportedProgram  # its export, dynamic batch
    pt2: bytes  # torch.export.save of `program`
    report: dict[str, Any]  # {"sbp": ..., "metrics": ...}, as the zoo's SBP manifests
    manifest: dict[str, Any]  # torch.export manifest; add "description", "original" etc.

    def write(self, folder: str | Path) -> dict[str, Path]:
        """manifest.json and classifier.pt2 in `folder`; returns the paths by name."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"manifest.json": folder / "manifest.json", PROGRAM_FILE: folder / PROGRAM_FILE}
        paths[PROGRAM_FILE].write_bytes(self.pt2)
        paths["manifest.json"].write_text(json.dumps(self.manifest, indent=2) + "\n")
        return paths


def prepare_sbp_prune(program: ExportedProgram, spec: ClassifierSpec) -> BlockNet:
    """Lift the program into a plain BlockNet; UnsupportedGraph if it does not fit."""
    net = lift(program, spec.input_shape, spec.value_range)
    check_outputs(net, spec)
    return to_block_net(net)


def check_settings(settings: PruneSettings, train_rows: int) -> None:
    """BadData naming the setting that cannot work."""
    checks = {
        "epochs": settings.epochs >= 1,
        "batch_size": 1 <= settings.batch_size <= train_rows,
        "lr": settings.lr > 0,
        "sbp_lr_factor": settings.sbp_lr_factor > 0,
        "kl_weight": settings.kl_weight >= 0,
        "checkpoint_every": settings.checkpoint_every >= 1,
        "seed": 0 <= settings.seed < 2**63,
    }
    for name, ok in checks.items():
        if not ok:
            raise BadData(name, f"{getattr(settings, name)!r} is out of range")


def fingerprint(blocks: BlockNet, train: Dataset, settings: PruneSettings) -> str:
    """sha256 of the starting network, the training data and the settings."""
    digest = hashlib.sha256(json.dumps(settings.to_dict(), sort_keys=True).encode())
    for key, value in sorted(blocks.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    digest.update(train.x.contiguous().numpy().tobytes())
    digest.update(train.y.contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_sbp_prune(
    program: ExportedProgram,
    spec: ClassifierSpec,
    train: Dataset,
    held_out: Dataset | None = None,
    settings: PruneSettings | None = None,
) -> tuple[BlockNet, Dataset, Dataset]:
    """Every check of the job, none of its work (the service calls it before queueing).

    Returns the block network and the (train, held out) sets the job will use: without
    `held_out`, a seeded `settings.held_out_fraction` of `train`. Raises UnsupportedGraph
    or BadData.
    """
    settings = settings or PruneSettings()
    blocks = prepare_sbp_prune(program, spec)
    require_labels(train, "train")
    if held_out is None:
        train, held_out = split_held_out(train, settings.held_out_fraction, settings.seed)
    require_labels(held_out, "held_out")
    check_settings(settings, len(train))
    return blocks, train, held_out


def run_sbp_prune(
    program: ExportedProgram,
    spec: ClassifierSpec,
    train: Dataset,
    held_out: Dataset | None = None,
    settings: PruneSettings | None = None,
    *,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    resume: Checkpoint | None = None,
    measure_speed: bool = True,
) -> PruneResult:
    """The whole sbp-prune job (see the module docstring).

    Without `held_out`, a seeded `settings.held_out_fraction` of `train` is held out.
    `on_checkpoint(checkpoint)` gets a Checkpoint every `settings.checkpoint_every` steps
    (store it: `checkpoint.save(folder)`); pass the last one as `resume` to continue a
    killed or cancelled run with the same program, data and settings. Raises what
    `check_sbp_prune` raises before any work, JobCancelled (with a checkpoint) when
    should_stop() says so, ValueError for a checkpoint of another job.
    """
    settings = settings or PruneSettings()
    blocks, train, held_out = check_sbp_prune(program, spec, train, held_out, settings)
    noisy = sbp.add_sbp(blocks)
    report_progress(progress, 0.0, phase="lifted", units=[b.units for b in blocks.blocks])

    def training_progress(fraction: float, info: dict[str, Any]) -> None:
        report_progress(progress, TRAIN_SHARE * fraction, **info)

    history = train_resumable(
        noisy,
        train.x,
        train.y,
        settings,
        fingerprint=fingerprint(blocks, train, settings),
        resume=resume,
        on_checkpoint=on_checkpoint,
        progress=training_progress,
        should_stop=should_stop,
    )
    check_stop(should_stop)
    small, compression = sbp.compress(noisy)
    sbp_diff = _max_diff(small, noisy, held_out.x)
    exported = export_classifier(small, spec.input_shape)
    data = program_bytes(exported)
    export_diff = _max_diff(load_program_bytes(data).module(), small, held_out.x)
    if export_diff > MAX_EXPORT_DIFF:
        raise RuntimeError(f"the exported program differs from the network by {export_diff}")
    report_progress(progress, TRAIN_SHARE + 0.02, phase="compressed")
    speed = _speed(program, blocks, small, exported, spec) if measure_speed else None
    report = _report(blocks, small, compression, held_out, speed, sbp_diff, exported)
    report["sbp"].update(settings=settings.to_dict(), history=history, inputs=len(train),
                         dropped_log_softmax=bool(blocks.dropped_log_softmax))  # fmt: skip
    report_progress(progress, 1.0, phase="done")
    manifest = {**spec.manifest_fields(), "format": "torch.export", "file": PROGRAM_FILE,
                "uncertainty": "none", **report}  # fmt: skip
    return PruneResult(small, exported, data, report, manifest)


@torch.no_grad()
def _max_diff(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    x = x[:1024]
    return float((a(x) - b.eval()(x)).abs().max())


def _speed(program, blocks, small, exported, spec: ClassifierSpec) -> dict[str, Any]:
    """Block net before vs after (the zoo's measure: same kernels, pruning alone), and the
    uploaded program vs the exported one (what the service runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(SPEED_THREADS)
    try:
        shape = tuple(spec.input_shape)
        networks = measure_speedup(blocks, small, shape, SPEED_BATCHES)
        seconds = measure_latencies(
            {"uploaded": _Served(program), "exported": _Served(exported)}, shape, SPEED_BATCHES
        )
    finally:
        torch.set_num_threads(threads)
    programs = {
        str(batch): {
            "uploaded_ms": 1e3 * seconds["uploaded"][str(batch)],
            "exported_ms": 1e3 * seconds["exported"][str(batch)],
            "speedup": seconds["uploaded"][str(batch)] / seconds["exported"][str(batch)],
        }
        for batch in SPEED_BATCHES
    }
    return {"threads": SPEED_THREADS, "batch_sizes": networks, "programs": programs}


class _Served(torch.nn.Module):
    """An exported program's module as the service runs it; it has no train/eval modes."""

    def __init__(self, program: ExportedProgram):
        super().__init__()
        self.module = program.module()

    def train(self, mode: bool = True) -> _Served:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _report(blocks, small, compression, held_out: Dataset, speed, sbp_diff, exported) -> dict:
    before = accuracy_and_nll(predict_in_chunks(blocks, held_out.x), held_out.y)
    after = accuracy_and_nll(predict_in_chunks(small, held_out.x), held_out.y)
    sbp_report = {
        **compression.to_dict(),
        "snr_threshold": sbp.SNR_THRESHOLD,
        "log_theta_range": [sbp.LOG_THETA_MIN, sbp.LOG_THETA_MAX],
        "max_abs_diff_vs_sbp_network": sbp_diff,
        "program_ops": program_ops(exported),
    }
    metrics = {
        "accuracy": after["accuracy"],
        "error": 1 - after["accuracy"],
        "original_error": 1 - before["accuracy"],
        "error_increase": before["accuracy"] - after["accuracy"],
        "nll": after["nll"],
        "original_nll": before["nll"],
        "params": compression.params_after,
        "params_reduction": compression.params_reduction,
        "flops": compression.flops_after,
        "flops_reduction": compression.flops_reduction,
        "units_before": compression.units_before,
        "units_after": compression.units_after,
        "evaluation": f"held-out inputs ({len(held_out)})",
    }
    if speed is not None:
        sbp_report["speed"] = speed
        for batch in SPEED_BATCHES:
            metrics[f"speedup_batch_{batch}"] = speed["batch_sizes"][str(batch)]["speedup"]
        metrics["evaluation"] += f"; speed on CPU, {SPEED_THREADS} thread"
    return {"sbp": sbp_report, "metrics": metrics}
