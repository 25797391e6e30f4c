"""Train the 25-Gaussians zoo models and write them to the model store.

Run (a few minutes on 2 CPU cores, one thread; same code on CUDA):
    .venv/bin/python -m zoo.train_toy25 [--store zoo/store]

What it writes, each as <store>/<name>/1/manifest.json plus files:
- toy25: the generator. The GAN is stopped early on purpose (5000 steps), so the raw
  generator is visibly imperfect: off-mode samples and uneven modes, as GANs are in
  practice. Also 2048 held-out real points (real.safetensors, "x") to start chains.
- toy25-d: post-hoc BCE discriminator trained for the FROZEN generator on fresh real
  points. For a fixed G its optimum is p / (p + p_G), exactly what MH needs.
- toy25-d-imh: the same with the implicit-MH loss (optimum: log p / p_G up to a constant).
- toy25-d-gan: the GAN's own final discriminator, for comparison.
- toy25-pair: a pair discriminator for the data-space Gaussian random walk of scale 0.3.

Every sample discriminator carries a calibration fitted on held-out real points and
fresh generator samples that no discriminator saw in training. Each manifest records
its figures under "metrics" (raw generator quality, IMH quality with each calibration,
calibration ECE before and after).

Seeded: with one CPU thread a rerun reproduces the committed weights.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from architectures import architecture_name, save_weights
from discriminators.architectures import MLPDiscriminator
from discriminators.calibration import (
    Calibrator,
    fit_and_report,
    save_calibration,
)
from discriminators.losses import bce_loss
from discriminators.training import train_discriminator, train_pair_discriminator
from evaluation.toy25 import toy25_metrics, toy25_sample
from samplers import chain, imh, markov, proposals
from samplers._core import Noise
from zoo.toy25 import Generator, PotentialPairDiscriminator

STORE = Path(__file__).resolve().parent / "store"
COMMAND = ".venv/bin/python -m zoo.train_toy25"
VERSION = "1"


@dataclass
class Config:
    seed: int = 0
    # GAN: non-saturating loss, Adam(0.5, 0.999). 5000 steps leaves G imperfect (HQ rate
    # about 0.8, mode masses from about 0.01% to 9%); about 10000 would make it nearly
    # perfect, which would leave nothing for a sampler to show.
    gan_steps: int = 5000
    gan_batch: int = 128
    gan_lr: float = 5e-4
    # Post-hoc discriminators: a fast phase then a slow one, fresh fake rows every step.
    posthoc_steps: tuple[int, int] = (4000, 2000)
    posthoc_lr: tuple[float, float] = (1e-3, 1e-4)
    posthoc_batch: int = 512
    real_pool: int = 200_000  # fresh real points the post-hoc trainers draw from
    # Calibration rows per class (half fit, half report), disjoint from all training data.
    calibration_rows: int = 20_000
    real_samples: int = 2048  # held-out real points shipped to start chains
    # Pair discriminator for x' = x + scale * xi. Measured on this G (HQ after 100 steps
    # from generator samples): 0.05 stalls, 0.1 -> 0.94, 0.2 -> 0.97, 0.3 -> 0.98,
    # 0.5 -> 0.92 (long jumps leave the region the pair network was trained on).
    pair_scale: float = 0.3
    # Without the slow phase the chain's mode histogram drifts (JSD 0.08 -> 0.25 over
    # 200 steps): the potential's level per mode is only weakly pinned by local jumps.
    pair_steps: tuple[int, int] = (3000, 1500)
    pair_lr: tuple[float, float] = (1e-3, 1e-4)
    pair_batch: int = 512
    check_chains: int = 10_000  # rows of the quality checks recorded in the manifests
    check_steps: tuple[int, ...] = (20, 50, 100)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_gan(config: Config, device: torch.device) -> tuple[Generator, MLPDiscriminator]:
    """Standard GAN (non-saturating generator loss), stopped early on purpose."""
    torch.manual_seed(config.seed)
    generator, discriminator = Generator().to(device), MLPDiscriminator(2, 100, 4).to(device)
    betas = (0.5, 0.999)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.gan_lr, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.gan_lr, betas=betas)
    # Draw on the CPU and move: the same stream of data on any device.
    rng = torch.Generator().manual_seed(config.seed)
    ones = torch.ones(config.gan_batch, device=device)
    bar = tqdm(range(config.gan_steps), desc="toy25 GAN")
    for step in bar:
        real = toy25_sample(config.gan_batch, rng).to(device)
        fake = generator(torch.randn(config.gan_batch, 2, generator=rng).to(device))
        loss_d = bce_loss(discriminator(real), discriminator(fake.detach()))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = F.binary_cross_entropy_with_logits(discriminator(fake), ones)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        if step % 100 == 0:
            bar.set_postfix(loss_d=f"{loss_d.item():.3f}", loss_g=f"{loss_g.item():.3f}")
    return generator.eval(), discriminator.eval()


def fake_sampler(generator: nn.Module, latent_dim: int):
    """sample_fake(n, gen) for the trainers: G on latents drawn from `gen`."""

    def sample_fake(n: int, gen: torch.Generator) -> torch.Tensor:
        return generator(torch.randn(n, latent_dim, generator=gen, device=gen.device))

    return sample_fake


def train_posthoc(
    discriminator: nn.Module,
    generator: nn.Module,
    real: torch.Tensor,
    *,
    latent_dim: int,
    loss: str,
    steps: tuple[int, ...],
    lrs: tuple[float, ...],
    batch_size: int,
    seed: int,
    device: torch.device,
) -> list[float]:
    """Post-hoc training for a frozen G, one `train_discriminator` call per lr phase."""
    sample_fake = fake_sampler(generator, latent_dim)
    history: list[float] = []
    for phase, (phase_steps, lr) in enumerate(zip(steps, lrs, strict=True)):
        history += train_discriminator(
            discriminator,
            sample_fake,
            real,
            loss=loss,
            steps=phase_steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed + phase,
            device=device,
            progress=True,
        )
    discriminator.eval()
    return history


@torch.no_grad()
def calibrate(
    discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, seed: int
) -> tuple[dict[str, Calibrator], dict[str, Any]]:
    """Fit every calibration on held-out real and fresh fake rows; report on the rest."""
    return fit_and_report(discriminator(real).cpu(), discriminator(fake).cpu(), seed=seed)


def metrics_dict(samples: torch.Tensor) -> dict[str, Any]:
    m = toy25_metrics(samples.cpu())
    return {
        "high_quality_rate": round(m.high_quality_rate, 4),
        "modes_covered": m.modes_covered,
        "jsd_from_uniform": round(m.jsd_from_uniform, 5),
        "within_mode_std": round(m.within_mode_std, 4),
        "smallest_mode": min(m.mode_counts),
        "largest_mode": max(m.mode_counts),
        "samples": m.count,
    }


@torch.no_grad()
def imh_check(
    generator: nn.Module,
    log_ratio,
    starts: torch.Tensor,
    steps: tuple[int, ...],
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Independent MH from held-out real starts (MH-GAN), metrics after each K in steps."""
    propose = proposals.independent(generator, latent_dim=2)
    kernel = imh.build(propose, log_ratio)
    results = {}
    for k in steps:
        noise = Noise.seeded(seed, rows=len(starts), device=starts.device)
        result = chain.run_final(kernel, imh.init_real(starts, log_ratio), noise, k)
        results[f"k{k}"] = metrics_dict(result.samples) | {
            "acceptance_rate": round(result.acceptance_rate, 4)
        }
    return results


@torch.no_grad()
def markov_check(
    generator: nn.Module, pair: nn.Module, scale: float, rows: int, steps: int, seed: int
) -> dict[str, Any]:
    """Gaussian random walk with the pair discriminator, from generator samples."""
    device = next(pair.parameters()).device
    noise = Noise.seeded(seed, rows=rows, device=device)
    kernel = markov.build(proposals.gaussian_perturbation, pair)
    start = markov.init_generator(proposals.independent(generator, 2), noise, scale)
    result = chain.run_final(kernel, start, noise, steps)
    return metrics_dict(result.samples) | {"acceptance_rate": round(result.acceptance_rate, 4)}


def write_model(
    store: Path,
    name: str,
    manifest: dict[str, Any],
    model: nn.Module,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    calibration: tuple[dict[str, Calibrator], dict[str, Any]] | None = None,
) -> Path:
    """Write <store>/<name>/1/: weights.safetensors, manifest.json and any extra files.

    `tensors` maps extra safetensors file names to their tensors; `calibration` is
    written as calibration.json and named in the manifest.
    """
    folder = store / name / VERSION
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder / "weights.safetensors")
    for file_name, content in (tensors or {}).items():
        tensors_cpu = {key: value.detach().cpu().contiguous() for key, value in content.items()}
        save_file(tensors_cpu, folder / file_name)
    head = {
        "kind": manifest.pop("kind"),
        "format": "zoo",
        "architecture": architecture_name(model),
        "config": manifest.pop("config"),
        "weights": "weights.safetensors",
    }
    if calibration is not None:
        save_calibration(folder / "calibration.json", *calibration)
        head["calibration"] = "calibration.json"
    text = json.dumps(head | manifest, indent=2, allow_nan=False)
    (folder / "manifest.json").write_text(text + "\n")
    return folder


def default_calibration(report: dict[str, dict[str, float]]) -> str:
    """The smooth calibration (logistic or beta) with the lower held-out ECE.

    Isotonic often has the lowest ECE, but its logit is a step function: states on one
    step tie, so MH cannot prefer the better of two samples there, and short chains on
    digits come out worse with it. Samplers get a strictly monotone map by default.
    """
    return min(("logistic", "beta"), key=lambda name: report[name]["ece"])


def ece_summary(report: dict[str, dict[str, float]]) -> dict[str, float]:
    return {name: round(figures["ece"], 4) for name, figures in report.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=STORE)
    args = parser.parse_args(argv)
    config = Config()
    device = default_device()
    torch.set_num_threads(1)  # small MLPs gain nothing from more; one thread is repeatable
    started = time.perf_counter()

    # Data, all from fixed, separate streams: nothing held out is ever trained on.
    real_pool = toy25_sample(config.real_pool, torch.Generator().manual_seed(1001))
    held_out = toy25_sample(
        config.calibration_rows + config.real_samples + config.check_chains,
        torch.Generator().manual_seed(1002),
    ).to(device)
    calibration_real, shipped_real, check_starts = held_out.split(
        [config.calibration_rows, config.real_samples, config.check_chains]
    )

    generator, gan_discriminator = train_gan(config, device)
    with torch.no_grad():
        latents = torch.randn(config.check_chains, 2, generator=_gen(7, device), device=device)
        raw = generator(latents)
        calibration_fake = generator(
            torch.randn(config.calibration_rows, 2, generator=_gen(1003, device), device=device)
        )
    raw_metrics = metrics_dict(raw)
    print("raw generator:", raw_metrics)

    sample_discriminators: dict[str, tuple[nn.Module, str]] = {
        "toy25-d": (MLPDiscriminator(2, 100, 4), "bce"),
        "toy25-d-imh": (MLPDiscriminator(2, 100, 4), "implicit_mh"),
        "toy25-d-gan": (gan_discriminator, "gan"),
    }
    descriptions = {
        "toy25-d": "25 Gaussians: post-hoc BCE discriminator for the frozen toy25 generator",
        "toy25-d-imh": "25 Gaussians: post-hoc discriminator, implicit-MH loss (toy25)",
        "toy25-d-gan": "25 Gaussians: the toy25 GAN's own final discriminator",
    }
    for index, (name, (discriminator, loss)) in enumerate(sample_discriminators.items()):
        training: dict[str, Any] = {"loss": loss}
        if loss != "gan":
            torch.manual_seed(config.seed + 10 + index)  # initial weights
            discriminator.to(device)
            history = train_posthoc(
                discriminator,
                generator,
                real_pool,
                latent_dim=2,
                loss=loss,
                steps=config.posthoc_steps,
                lrs=config.posthoc_lr,
                batch_size=config.posthoc_batch,
                seed=config.seed + 100 * (index + 1),
                device=device,
            )
            training |= {
                "steps": list(config.posthoc_steps),
                "lr": list(config.posthoc_lr),
                "batch_size": config.posthoc_batch,
                "final_loss": round(sum(history[-200:]) / 200, 4),
            }
        calibrators, report = calibrate(
            discriminator, calibration_real, calibration_fake, config.seed
        )
        default = default_calibration(report)
        checks = {
            calibration: imh_check(
                generator,
                lambda x, c=calibrator, d=discriminator: c(d(x)),
                check_starts,
                config.check_steps,
                seed=config.seed + 5,
            )
            for calibration, calibrator in calibrators.items()
        }
        print(f"{name}: calibration ECE {ece_summary(report)}; default {default}")
        for calibration, figures in checks.items():
            print(f"  imh ({calibration}):", {k: _short(v) for k, v in figures.items()})
        write_model(
            args.store,
            name,
            {
                "kind": "discriminator",
                "config": {"input_dim": 2, "width": 100, "depth": 4},
                "description": descriptions[name],
                "generator": "toy25",
                "input": "sample",
                "output": "logit",
                "default_calibration": default,
                "training": training,
                "metrics": {
                    "calibration_ece": ece_summary(report),
                    "imh_from_real_starts": checks,
                },
            },
            discriminator,
            calibration=(calibrators, report),
        )

    pair = PotentialPairDiscriminator(input_dim=2, width=100, depth=4, b=1e-3)
    torch.manual_seed(config.seed + 20)
    scale = config.pair_scale

    def propose(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return x + scale * torch.randn(x.shape, generator=gen, device=gen.device)

    history: list[float] = []
    for phase, (steps, lr) in enumerate(zip(config.pair_steps, config.pair_lr, strict=True)):
        history += train_pair_discriminator(
            pair,
            propose,
            real_pool,
            steps=steps,
            batch_size=config.pair_batch,
            lr=lr,
            seed=config.seed + 400 + phase,
            device=device,
            progress=True,
        )
    pair.eval()
    pair_checks = {
        f"k{k}": markov_check(generator, pair, scale, config.check_chains, k, config.seed + 6)
        for k in config.check_steps
    }
    print("toy25-pair markov:", {k: _short(v) for k, v in pair_checks.items()})
    write_model(
        args.store,
        "toy25-pair",
        {
            "kind": "discriminator",
            "config": {"input_dim": 2, "width": 100, "depth": 4, "b": 1e-3},
            "description": "25 Gaussians: pair discriminator for a Gaussian random walk (0.3)",
            "generator": "toy25",
            "input": "pair",
            "output": "log_d",
            "proposal": {"type": "gaussian", "scale": scale},
            "training": {
                "loss": "implicit_mh_pair",
                "steps": list(config.pair_steps),
                "lr": list(config.pair_lr),
                "batch_size": config.pair_batch,
                "final_loss": round(sum(history[-200:]) / 200, 4),
            },
            "metrics": {"markov_from_generator_starts": pair_checks},
        },
        pair,
    )

    write_model(
        args.store,
        "toy25",
        {
            "kind": "generator",
            "config": {"latent_dim": 2, "width": 100, "depth": 4},
            "description": "25 Gaussians (MH-GAN grid): 2-D GAN generator, deliberately imperfect",
            "latent_dim": 2,
            "sample_shape": [2],
            "image": False,
            "discriminator": "toy25-d",
            "real_samples": "real.safetensors",
            # The pair discriminator toy25-pair was trained for this random-walk scale.
            "sampler_defaults": {"markov": {"scale": config.pair_scale}},
            "training": asdict(config) | {"device": str(device), "command": COMMAND},
            "metrics": {"raw_generator": raw_metrics},
        },
        generator,
        tensors={"real.safetensors": {"x": shipped_real}},
    )
    print(f"wrote {args.store}/toy25* in {time.perf_counter() - started:.0f} s")


def _gen(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _short(figures: dict[str, Any]) -> str:
    return (
        f"hq={figures['high_quality_rate']} modes={figures['modes_covered']} "
        f"jsd={figures['jsd_from_uniform']}"
    )


if __name__ == "__main__":
    main()
