"""The checkpoints and the draw that every quality benchmark shares.

`Zoo` loads a generator's checkpoints once; `draw` runs one method on n chains (DRS: n
rows) as a final-mode request would: `prepare(..., steps=K)` (so "auto" step sizes warm
up for K / 2 steps) and `run_final`, one sample per chain. DRS rows that spend their
proposal budget are left out of the samples and counted (fallback); proposals per
sample counts the candidates evaluated (steps x the method's proposals per step; a
chain's start is not counted) per returned sample.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats

from discriminators.calibration import load_calibration
from samplers import Noise, proposals, run_final
from samplers.methods import TABLE, Models, prepare
from zoo import catalog


@dataclass(frozen=True)
class Config:
    label: str
    method: str
    discriminator: str | None = None
    calibration: str = "none"
    params: dict[str, Any] = field(default_factory=dict)
    steps: int = 1


class Zoo:
    """Loads each checkpoint once and builds `samplers.methods.Models` per config."""

    def __init__(self, generator: str):
        self.name = generator
        self.manifest = catalog.read_manifest(generator)
        self.generator = catalog.load(generator)
        self.latent_dim = int(self.manifest["latent_dim"])
        self.real = self._real()
        self._pilots: dict[tuple[str, str], torch.Tensor] = {}

    def _real(self) -> torch.Tensor | None:
        from safetensors.torch import load_file

        if "real_samples" not in self.manifest:
            return None
        return load_file(str(catalog.model_dir(self.name) / self.manifest["real_samples"]))["x"]

    def models(self, config: Config) -> Models:
        if config.discriminator is None:
            return Models(self.generator, self.latent_dim)
        manifest = catalog.read_manifest(config.discriminator)
        network = catalog.load(config.discriminator)
        if manifest.get("input") == "pair":
            proposal = manifest.get("proposal")
            move = None
            if isinstance(proposal, str):
                noise_dim = int(catalog.read_manifest(proposal)["noise_dim"])
                move = proposals.conditional(catalog.load(proposal), noise_dim)
            return Models(
                self.generator,
                self.latent_dim,
                log_pair=network,
                markov_proposal=move,
                real=self.real,
            )
        calibrate = self._calibrator(config.discriminator, manifest, config.calibration)
        return Models(
            self.generator,
            self.latent_dim,
            log_ratio=lambda x: calibrate(network(x)),
            real=self.real,
        )

    def markov_scale(self, config: Config) -> float | None:
        proposal = catalog.read_manifest(config.discriminator).get("proposal")
        return float(proposal["scale"]) if isinstance(proposal, dict) else None

    @staticmethod
    def _calibrator(name: str, manifest: dict[str, Any], calibration: str):
        if calibration == "none":
            return lambda logit: logit
        calibrators, _ = load_calibration(catalog.model_dir(name) / manifest["calibration"])
        return calibrators[calibration]


@dataclass(frozen=True)
class Draw:
    samples: torch.Tensor  # what the metrics see: drs rows without a sample left out
    acceptance: float
    proposals_per_sample: float
    fallback: int  # drs rows that spent their budget
    seconds: float


def draw(zoo: Zoo, config: Config, n: int, seed: int) -> Draw:
    """n chains (drs: n rows) run as a final-mode request would."""
    params = dict(config.params)
    if config.method == "markov" and (scale := zoo.markov_scale(config)) is not None:
        params.setdefault("scale", scale)
    noise = Noise.seeded(seed, n)
    start = time.perf_counter()
    kernel, state = prepare(config.method, zoo.models(config), params, noise, steps=config.steps)
    result = run_final(kernel, state, noise, config.steps)
    seconds = time.perf_counter() - start
    samples = result.samples
    if result.has_sample is not None:  # never pass a fallback off as a filtered sample
        samples = samples[result.has_sample]
    spec = TABLE[config.method]
    candidates = result.proposals * spec.proposals_per_step(spec.validate(params))
    per_sample = candidates / max(len(samples), 1)
    return Draw(samples, result.acceptance_rate, per_sample, result.fallback, seconds)


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval."""
    if len(values) < 2:
        return float(values[0]), math.nan
    sem = np.std(values, ddof=1) / math.sqrt(len(values))
    return float(np.mean(values)), float(stats.t.ppf(0.975, len(values) - 1) * sem)
