"""SBP fine-tuning that can stop at any step and resume exactly where it stopped.

`train_resumable` runs the optimisation of classifiers.sbp.train_sbp (same Adam groups,
learning-rate schedule, shuffling and noise draws, so without interruptions it gives
bit for bit the same network), and every `checkpoint_every` steps hands a `Checkpoint`
to `on_checkpoint`. Resuming from a checkpoint restores the network, Adam's moments, the
shuffling and noise generators (the run's own: torch's global one is never used), the
current epoch's order and the running totals, so an interrupted run ends with the same
network as one that never stopped; a worker killed mid-training loses at most the steps
since its last checkpoint.

Checkpoint format: one safetensors file (`Checkpoint.to_bytes()`, or `save(folder)`
writing `folder/checkpoint.safetensors` atomically), so tensors and position never part:

    tensors   "model.<key>"          the SBP network's state dict
              "optimizer.<i>.<name>" Adam state of parameter i (step, exp_avg, exp_avg_sq)
              "rng.noise"            the noise generator's state (uint8)
              "rng.shuffle"          the shuffling generator's state (uint8)
              "order"                the current epoch's permutation (int64)
    metadata  "meta": JSON {"format": 1, "step", "epoch", "batch" (next batch of the
              epoch), "steps", "settings", "fingerprint", "history", "totals"}

`Checkpoint.tensors` and `Checkpoint.meta` (JSON-able) are the same two parts, for a
caller that stores them its own way.

The fingerprint (of the data, the settings and the starting network) is compared on
resume, so a checkpoint never continues a different job.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load, save
from torch import nn

from classifiers.job_common import JobCancelled, Progress, ShouldStop
from classifiers.sbp import kl_divergence, sbp_layers

CHECKPOINT_FORMAT = 1
CHECKPOINT_FILE = "checkpoint.safetensors"


@dataclass(frozen=True)
class PruneSettings:
    """SBP fine-tuning settings; the defaults are the zoo's digits recipe."""

    epochs: int = 60
    batch_size: int = 32  # small batches: SBP needs steps more than epochs
    lr: float = 1e-3
    sbp_lr_factor: float = 10.0  # mu and log sigma learn this much faster
    kl_weight: float = 1.0  # loss N * mean(CE) + kl_weight * KL
    seed: int = 0
    checkpoint_every: int = 200  # steps between checkpoints
    held_out_fraction: float = 0.2  # when no held-out set is given

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]  # JSON-able

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def to_bytes(self) -> bytes:
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        return save(tensors, metadata={"meta": json.dumps(self.meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        meta = json.loads(header.get("__metadata__", {}).get("meta", "{}"))
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {meta.get('format')} is not {CHECKPOINT_FORMAT}")
        return cls(load(data), meta)

    def save(self, folder: str | Path) -> Path:
        """Write folder/checkpoint.safetensors (a temporary file renamed: a crash mid-save
        leaves the previous checkpoint whole); returns its path."""
        path = Path(folder) / CHECKPOINT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(CHECKPOINT_FILE + ".tmp")
        temporary.write_bytes(self.to_bytes())
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Checkpoint:
        return cls.from_bytes((Path(folder) / CHECKPOINT_FILE).read_bytes())


def _optimizer(model: nn.Module, settings: PruneSettings) -> torch.optim.Adam:
    """Adam with the noise parameters at lr * sbp_lr_factor, as classifiers.sbp.fit."""
    noise = [p for n, p in model.named_parameters() if "sbp." in n or "log_sigma2" in n]
    noise_ids = {id(p) for p in noise}
    groups = [{"params": [p for p in model.parameters() if id(p) not in noise_ids],
               "lr": settings.lr}]  # fmt: skip
    if noise:
        groups.append({"params": noise, "lr": settings.lr * settings.sbp_lr_factor})
    return torch.optim.Adam(groups)


class _Run:
    """The loop's position and what it has accumulated; becomes a Checkpoint."""

    def __init__(self, settings: PruneSettings, rows: int, fingerprint: str):
        self.settings, self.fingerprint = settings, fingerprint
        self.steps_per_epoch = math.ceil(rows / settings.batch_size)
        self.steps = settings.epochs * self.steps_per_epoch
        self.step = self.epoch = self.batch = 0
        self.order = torch.zeros(0, dtype=torch.long)
        self.history: list[dict[str, float]] = []
        self.totals = {"ce": 0.0, "penalty": 0.0}

    def checkpoint(self, model, optimizer, shuffle, noise: torch.Generator) -> Checkpoint:
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        for index, state in optimizer.state_dict()["state"].items():
            tensors.update({f"optimizer.{index}.{name}": value for name, value in state.items()})
        tensors.update({"rng.noise": noise.get_state(), "rng.shuffle": shuffle.get_state(),
                        "order": self.order})  # fmt: skip
        meta = {"format": CHECKPOINT_FORMAT, "step": self.step, "epoch": self.epoch,
                "batch": self.batch, "steps": self.steps, "settings": self.settings.to_dict(),
                "fingerprint": self.fingerprint, "history": self.history,
                "totals": self.totals}  # fmt: skip
        return Checkpoint({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta)))

    def restore(self, checkpoint: Checkpoint, model, optimizer, shuffle, noise) -> None:
        meta, tensors = checkpoint.meta, checkpoint.tensors
        if meta.get("fingerprint") != self.fingerprint or meta.get("steps") != self.steps:
            raise ValueError("the checkpoint belongs to another job (data, settings or network)")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        state = optimizer.state_dict()
        state["state"] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state["state"].setdefault(int(index), {})[name] = value.clone()
        optimizer.load_state_dict(state)
        noise.set_state(tensors["rng.noise"])
        shuffle.set_state(tensors["rng.shuffle"])
        self.order = tensors["order"].clone()
        self.step, self.epoch, self.batch = meta["step"], meta["epoch"], meta["batch"]
        self.history, self.totals = list(meta["history"]), dict(meta["totals"])


def train_resumable(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: PruneSettings,
    *,
    fingerprint: str = "",
    resume: Checkpoint | None = None,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> list[dict[str, float]]:
    """Fine-tune an SBP network (with its noise layers) in place; returns per-epoch logs.

    x (N, *input_shape) float32, y (N,) int64, on the model's device. `progress(fraction
    of training, info)` is called about a hundred times; `should_stop()` before every
    step: when it says so, JobCancelled carries a checkpoint of the work so far. Draws
    come from generators of the run's own, never torch's global one, so jobs in several
    threads stay reproducible. The model is left in eval mode.
    """
    if not sbp_layers(model):
        raise ValueError("the model has no SBP layers: use classifiers.sbp.add_sbp first")
    run = _Run(settings, len(x), fingerprint)
    optimizer = _optimizer(model, settings)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    # two generators of the job's own (the noise one draws what torch's global generator,
    # seeded alike, draws in classifiers.sbp.fit): no other thread shares them
    shuffle = torch.Generator().manual_seed(settings.seed)
    noise = torch.Generator().manual_seed(settings.seed)
    every = max(1, run.steps // 100)
    if resume is not None:
        run.restore(resume, model, optimizer, shuffle, noise)
    layers = sbp_layers(model)
    for layer in layers:
        layer.noise_generator = noise
    model.train()
    try:
        while run.epoch < settings.epochs:
            decay = min(1.0, 2.0 * (1.0 - run.epoch / settings.epochs))
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * decay
            if run.batch == 0:
                run.order = torch.randperm(len(x), generator=shuffle)
                run.totals = {"ce": 0.0, "penalty": 0.0}
            while run.batch < run.steps_per_epoch:
                if should_stop is not None and should_stop():
                    checkpoint = run.checkpoint(model, optimizer, shuffle, noise)
                    raise JobCancelled("cancelled", checkpoint)
                _step(model, optimizer, x, y, run, settings)
                if on_checkpoint is not None and run.step % settings.checkpoint_every == 0:
                    on_checkpoint(run.checkpoint(model, optimizer, shuffle, noise))
                if progress is not None and (run.step % every == 0 or run.step == run.steps):
                    progress(run.step / run.steps, {"phase": "sbp", "step": run.step,
                             "steps": run.steps, "epoch": run.epoch + 1, **run.totals})  # fmt: skip
            run.history.append({"epoch": run.epoch + 1, **run.totals})
            run.epoch, run.batch = run.epoch + 1, 0
    finally:
        for layer in layers:
            layer.noise_generator = None
    model.eval()
    return run.history


def _step(model, optimizer, x, y, run: _Run, settings: PruneSettings) -> None:
    """One Adam step on batch `run.batch` of the epoch, as classifiers.sbp.fit takes it."""
    start = run.batch * settings.batch_size
    batch = run.order[start : start + settings.batch_size].to(x.device)
    ce = F.cross_entropy(model(x[batch]), y[batch])
    reg = kl_divergence(model)
    loss = len(x) * ce + settings.kl_weight * reg
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    for layer in sbp_layers(model):
        layer.project_()
    run.totals["ce"] += ce.item() * len(batch) / len(x)
    run.totals["penalty"] = reg.detach().item()
    run.batch, run.step = run.batch + 1, run.step + 1
