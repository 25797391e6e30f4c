"""Sample quality of every method on the built-in checkpoints.

Run:  .venv/bin/python -m benchmarks.quality            (about 10 minutes on 2 cores)
      .venv/bin/python -m benchmarks.quality --quick    (smaller, for a smoke check)

toy25: high-quality rate, modes covered, within-mode std and JSD from uniform of 10k
samples per method (MH-GAN's metrics). DRS keeps accepted proposals only, from at most
5K rounds of n proposals (exact DRS accepts about 1 in 1000 here, so it returns fewer).
digits: FID in the digit classifier's feature space against the held-out split, mean and
95% interval over seeds, plus the classifier's confidence on the samples. Writes
docs/RESULTS.md (sections "quality-toy25", "quality-digits"),
docs/img/toy25_scatter.png and docs/img/digits_grid.png.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats

from benchmarks.report import DOCS, machine, markdown_table, write_section
from discriminators.calibration import load_calibration
from evaluation import FeatureStats, load_stats, toy25_metrics
from samplers import Noise, proposals, run_final, run_stream
from samplers.methods import Models, prepare
from zoo import catalog

COMMAND = ".venv/bin/python -m benchmarks.quality"


@dataclass(frozen=True)
class Config:
    label: str
    method: str
    discriminator: str | None = None
    calibration: str = "none"
    params: dict[str, Any] = field(default_factory=dict)
    steps: int = 1


def toy25_configs(steps: int) -> list[Config]:
    return [
        Config("raw generator", "none"),
        Config("DRS (gamma=0)", "drs", "toy25-d", "none", steps=steps),
        Config("DRS (gamma=0, isotonic)", "drs", "toy25-d", "isotonic", steps=steps),
        Config("DRS (95th pct shift)", "drs", "toy25-d", "none", {"gamma_percentile": 95}, steps),
        Config("IMH, GAN's own D, raw", "imh", "toy25-d-gan", "none", steps=steps),
        Config("IMH, GAN's own D, isotonic", "imh", "toy25-d-gan", "isotonic", steps=steps),
        Config("IMH, post-hoc D, raw", "imh", "toy25-d", "none", steps=steps),
        Config("IMH, post-hoc D, isotonic", "imh", "toy25-d", "isotonic", steps=steps),
        Config("IMH, post-hoc D, logistic", "imh", "toy25-d", "logistic", steps=steps),
        Config("IMH, post-hoc D, beta", "imh", "toy25-d", "beta", steps=steps),
        Config("IMH, implicit-MH loss D", "imh", "toy25-d-imh", "none", steps=steps),
        Config("Markov implicit MH (Gaussian q)", "markov", "toy25-pair", steps=steps),
        Config("pCN (beta=0.5)", "pcn", "toy25-d", "none", {"beta": 0.5}, steps),
        Config("MALA (step 0.01)", "mala", "toy25-d", "none", {"step_size": 0.01}, steps),
    ]


def digits_configs(steps: int) -> list[Config]:
    return [
        Config("raw generator", "none"),
        Config("DRS (gamma=0)", "drs", "digits-d", "none", steps=steps),
        Config("DRS (gamma=0, isotonic)", "drs", "digits-d", "isotonic", steps=steps),
        Config("IMH, GAN's own D, isotonic", "imh", "digits-d-gan", "isotonic", steps=steps),
        Config("IMH, post-hoc D, raw", "imh", "digits-d", "none", steps=steps),
        Config("IMH, post-hoc D, isotonic", "imh", "digits-d", "isotonic", steps=steps),
        Config("IMH, post-hoc D, logistic", "imh", "digits-d", "logistic", steps=steps),
        Config("IMH, post-hoc D, beta", "imh", "digits-d", "beta", steps=steps),
        Config("Markov implicit MH (learned q)", "markov", "digits-pair", steps=steps),
        Config("pCN (beta=0.5)", "pcn", "digits-d", "none", {"beta": 0.5}, steps),
        Config("MALA (step 0.01)", "mala", "digits-d", "none", {"step_size": 0.01}, steps),
    ]


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


def draw(zoo: Zoo, config: Config, n: int, seed: int) -> tuple[torch.Tensor, float, float]:
    """n samples, acceptance rate, seconds."""
    params = dict(config.params)
    if config.method == "markov" and (scale := zoo.markov_scale(config)) is not None:
        params.setdefault("scale", scale)
    noise = Noise.seeded(seed, n)
    start = time.perf_counter()
    kernel, state = prepare(config.method, zoo.models(config), params, noise)
    if config.method == "drs":  # rejection sampling: keep accepted proposals only
        samples, rate = _accepted(kernel, state, noise, n, max_steps=5 * config.steps)
        return samples, rate, time.perf_counter() - start
    result = run_final(kernel, state, noise, config.steps)
    return result.samples, result.acceptance_rate, time.perf_counter() - start


def _accepted(kernel, state, noise, n: int, max_steps: int) -> tuple[torch.Tensor, float]:
    """The first n accepted proposals (fewer if max_steps rounds run out)."""
    kept, proposals = [], 0
    for samples, info in run_stream(kernel, state, noise, max_steps):
        kept.append(samples)
        proposals += len(info.is_accepted)
        if sum(len(k) for k in kept) >= n:
            break
    samples = torch.cat(kept)
    return samples[:n], len(samples) / proposals


def run_toy25(n: int, steps: int) -> tuple[str, list[tuple[str, torch.Tensor]]]:
    zoo = Zoo("toy25")
    rows, scatter = [], []
    for config in toy25_configs(steps):
        samples, rate, seconds = draw(zoo, config, n, seed=0)
        m = toy25_metrics(samples)
        rows.append(
            [
                config.label,
                config.steps,
                len(samples),
                f"{m.high_quality_rate:.3f}",
                m.modes_covered,
                f"{m.within_mode_std:.4f}",
                f"{m.jsd_from_uniform:.4f}",
                f"{rate:.3f}",
                f"{seconds:.1f}",
            ]
        )
        scatter.append((config.label, samples))
        print(rows[-1], flush=True)
    header = ["method", "K", "n", "HQ rate", "modes", "within-mode std", "JSD", "accept", "s"]
    return markdown_table(header, rows), scatter


def run_digits(n: int, steps: int, seeds: int) -> tuple[str, list[tuple[str, torch.Tensor]]]:
    zoo = Zoo("digits")
    folder = catalog.model_dir("digits")
    mu, sigma = load_stats(folder / zoo.manifest["reference_stats"])
    features = catalog.load(zoo.manifest["features"])
    rows, grids = [], []
    for config in digits_configs(steps):
        fids, confidences, rates, seconds = [], [], [], []
        for seed in range(seeds):
            samples, rate, secs = draw(zoo, config, n, seed)
            with torch.inference_mode():
                feats = features(samples)
                probs = classifier_probs(features, samples)
            fids.append(FeatureStats.from_features(feats.double().numpy()).fid_to((mu, sigma)))
            confidences.append(probs.max(1).values.numpy())
            rates.append(rate)
            seconds.append(secs)
        mean, half = interval(fids)
        conf = np.concatenate(confidences)
        rows.append(
            [
                config.label,
                config.steps,
                f"{mean:.2f} ± {half:.2f}",
                f"{conf.mean():.3f}",
                f"{(conf > 0.9).mean():.3f}",
                f"{np.mean(rates):.3f}",
                f"{np.mean(seconds):.1f}",
            ]
        )
        grids.append((config.label, samples[:64]))
        print(rows[-1], flush=True)
    header = ["method", "K", "FID (95% CI)", "mean confidence", "conf > 0.9", "accept", "s"]
    return markdown_table(header, rows), grids


def classifier_probs(features: torch.nn.Module, samples: torch.Tensor) -> torch.Tensor:
    """Softmax of the digit classifier behind the feature extractor (zoo.digits)."""
    return torch.softmax(features.head(features.features(samples)), dim=1)


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval."""
    if len(values) < 2:
        return float(values[0]), math.nan
    sem = np.std(values, ddof=1) / math.sqrt(len(values))
    return float(np.mean(values)), float(stats.t.ppf(0.975, len(values) - 1) * sem)


def plot_toy25(scatter: list[tuple[str, torch.Tensor]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    fig, axes = plt.subplots(math.ceil(len(scatter) / cols), cols, figsize=(4 * cols, 12))
    for ax, (label, samples) in zip(axes.flat, scatter, strict=False):
        pts = samples[:3000].numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
        ax.set(xlim=(-2.7, 2.7), ylim=(-2.7, 2.7), title=label, aspect="equal")
        ax.title.set_fontsize(9)
    for ax in list(axes.flat)[len(scatter) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(DOCS / "img" / "toy25_scatter.png", dpi=80)
    plt.close(fig)


def plot_digits(grids: list[tuple[str, torch.Tensor]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 3))
    for ax, (label, samples) in zip(axes, grids, strict=True):
        images = samples[:64, 0].numpy()  # (64, 8, 8)
        grid = images.reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(64, 64)
        ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(label, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(DOCS / "img" / "digits_grid.png", dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small n and K, no doc write")
    parser.add_argument("--only", choices=["toy25", "digits"])
    parser.add_argument("--digits-steps", type=int, default=50, help="K for digits chains")
    args = parser.parse_args()
    torch.manual_seed(0)
    toy_n, digits_n, steps, seeds = (2000, 500, 20, 2) if args.quick else (10000, 1000, 100, 3)
    digits_steps = min(steps, args.digits_steps)
    header = f"Command: `{COMMAND}` ({machine()}).\n\n"
    if args.only in (None, "toy25"):
        table, scatter = run_toy25(toy_n, steps)
        text = f"## Sample quality: toy25\n\n{header}n = {toy_n} per method, one seed.\n\n{table}"
        if not args.quick:
            plot_toy25(scatter)
        publish("quality-toy25", text, args.quick)
    if args.only in (None, "digits"):
        table, grids = run_digits(digits_n, digits_steps, seeds)
        text = (
            f"## Sample quality: digits\n\n{header}n = {digits_n} per seed, {seeds} seeds; FID "
            "in the digit classifier's feature space against the held-out split.\n\n" + table
        )
        if not args.quick:
            plot_digits(grids)
        publish("quality-digits", text, args.quick)


def publish(section: str, text: str, quick: bool) -> None:
    print(text, flush=True)
    if not quick:
        write_section("RESULTS.md", section, text)


if __name__ == "__main__":
    main()
