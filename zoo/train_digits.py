"""Train the digits zoo models and write them to the model store.

Run (a few minutes on 2 CPU cores, one thread; same code on CUDA):
    .venv/bin/python -m zoo.train_digits [--store zoo/store]

Data: zoo.data.load_digits_split (1347 train, 450 held-out test images, 1x8x8 in
[0, 1]). Everything trains on the train split only; the held-out split is used for the
classifier's accuracy, the FID reference statistics, calibration, and chain starts.

What it writes, each as <store>/<name>/1/manifest.json plus files:
- digits-features: a small conv classifier read at its penultimate layer (64 features),
  the FID feature space for digits; its manifest records the held-out accuracy.
- digits: the DCGAN generator, stopped early (1500 steps) so samples are recognisable
  but imperfect; ships the held-out images (real.safetensors, "x") and their feature
  statistics (reference.npz, pytorch-fid format).
- digits-d: post-hoc BCE discriminator for the FROZEN generator, with calibration.
- digits-d-gan: the GAN's own final discriminator, with calibration.
- digits-proposal: q(x | y) = G(sqrt(1 - rho^2) E(y) + rho xi), E trained to invert G.
- digits-pair: a pair discriminator trained with the Markov implicit-MH loss for that
  proposal (x from the train split, y ~ q(y | x)).

Manifests record the key figures under "metrics": FID of the raw generator and after
independent MH, classifier accuracy, calibration ECE before and after.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from discriminators.architectures import ConvDiscriminator, PairDiscriminator
from discriminators.calibration import Calibrator
from discriminators.losses import bce_loss
from discriminators.training import train_pair_discriminator
from evaluation.frechet import frechet_distance
from evaluation.stats import save_stats
from samplers import imh, markov, proposals
from samplers._core import Noise
from zoo.data import load_digits_split
from zoo.digits import DigitClassifier, DigitFeatures, Generator, Proposal
from zoo.train_toy25 import (
    STORE,
    default_calibration,
    default_device,
    ece_summary,
    train_posthoc,
    write_model,
)


@dataclass
class Config:
    seed: int = 0
    latent_dim: int = 16
    width: int = 64
    # Classifier: Adam with weight decay, one-pixel random shifts (the digits sit inside a
    # black border, so rolling wraps only background). About 99% held-out accuracy.
    classifier_width: int = 32
    feature_dim: int = 64
    classifier_epochs: int = 30
    classifier_batch: int = 32
    classifier_lr: float = 1e-3
    # GAN: non-saturating loss with an R1 penalty on D (without it this GAN collapses to
    # one digit within a few hundred steps). 1500 steps: FID about 35 in classifier
    # features, digits recognisable but rough; 3000 steps would reach about 22.
    gan_steps: int = 1500
    gan_batch: int = 64
    gan_lr: float = 2e-4
    r1_gamma: float = 10.0
    # Post-hoc D: 1000 steps, picked on a validation part of the train split (FID of
    # IMH samples against it): 500 -> 24, 1000 -> 20, 1500 -> 24, 3000 -> worse. Longer
    # training keeps lowering held-out BCE but memorises the 1347 images; the ratios
    # turn extreme, acceptance collapses and short chains mix worse.
    posthoc_steps: int = 1000
    posthoc_lr: float = 2e-4
    posthoc_batch: int = 256
    calibration_fake: int = 2000  # fresh generator rows (cut to the 450 real rows)
    # Proposal: rho = 0.5 keeps sqrt(0.75) of the encoded latent.
    rho: float = 0.5
    encoder_steps: int = 2000
    encoder_batch: int = 128
    encoder_lr: float = 1e-3
    reconstruction_weight: float = 1.0
    pair_width: int = 256
    pair_depth: int = 3
    pair_steps: int = 1500
    pair_batch: int = 256
    pair_lr: float = 3e-4
    fid_samples: int = 2000  # every FID in the manifests uses this many samples
    check_steps: tuple[int, ...] = (10, 20, 50, 100)


class FeatureSpace:
    """Classifier features of a batch, and FID against the held-out statistics."""

    def __init__(self, classifier: DigitClassifier, reference: torch.Tensor):
        self.classifier = classifier
        self.mu, self.sigma = self.stats(reference)

    @torch.no_grad()
    def stats(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        features = self.classifier.features(images).double().cpu().numpy()  # (N, F)
        return features.mean(axis=0), np.cov(features, rowvar=False)

    def fid(self, images: torch.Tensor) -> float:
        mu, sigma = self.stats(images)
        return round(frechet_distance(mu, sigma, self.mu, self.sigma), 2)


def shifted(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The batch rolled by one random offset in {-1, 0, 1}^2 (augmentation)."""
    dy, dx = torch.randint(-1, 2, (2,), generator=gen).tolist()
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))


def train_classifier(
    config: Config, x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> DigitClassifier:
    torch.manual_seed(config.seed)
    model = DigitClassifier(config.classifier_width, config.feature_dim).to(device)
    optimiser = torch.optim.Adam(model.parameters(), config.classifier_lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(config.seed)
    model.train()
    for _ in tqdm(range(config.classifier_epochs), desc="digits classifier"):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), config.classifier_batch):
            rows = order[start : start + config.classifier_batch]
            logits = model(shifted(x[rows], gen).to(device))
            loss = F.cross_entropy(logits, y[rows].to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


def train_gan(
    config: Config, x: torch.Tensor, device: torch.device
) -> tuple[Generator, ConvDiscriminator]:
    """Non-saturating GAN with an R1 penalty on D's real inputs, stopped early."""
    torch.manual_seed(config.seed + 1)
    generator = Generator(config.latent_dim, config.width).to(device)
    discriminator = ConvDiscriminator(1, 8, 64).to(device)
    betas = (0.5, 0.999)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.gan_lr, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.gan_lr, betas=betas)
    rng = torch.Generator().manual_seed(config.seed)  # CPU stream, moved: same on any device
    ones = torch.ones(config.gan_batch, device=device)
    bar = tqdm(range(config.gan_steps), desc="digits GAN")
    for step in bar:
        rows = torch.randint(len(x), (config.gan_batch,), generator=rng)
        real = x[rows].to(device).requires_grad_(True)
        fake = generator(torch.randn(config.gan_batch, config.latent_dim, generator=rng).to(device))
        logit_real = discriminator(real)
        (grad,) = torch.autograd.grad(logit_real.sum(), real, create_graph=True)
        r1 = grad.pow(2).flatten(1).sum(1).mean()
        loss_d = bce_loss(logit_real, discriminator(fake.detach())) + config.r1_gamma / 2 * r1
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = F.binary_cross_entropy_with_logits(discriminator(fake), ones)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        if step % 50 == 0:
            bar.set_postfix(loss_d=f"{loss_d.item():.3f}", loss_g=f"{loss_g.item():.3f}")
    return generator.eval(), discriminator.eval()


def train_encoder(
    config: Config, proposal: Proposal, x: torch.Tensor, device: torch.device
) -> list[float]:
    """Fit E so that E(G(z)) = z, plus G(E(x)) = x on real train images."""
    generator, encoder = proposal.generator, proposal.encoder
    generator.requires_grad_(False)
    optimiser = torch.optim.Adam(encoder.parameters(), config.encoder_lr)
    gen = torch.Generator().manual_seed(config.seed + 3)
    history = []
    encoder.train()
    bar = tqdm(range(config.encoder_steps), desc="digits encoder")
    for _ in bar:
        z = torch.randn(config.encoder_batch, config.latent_dim, generator=gen).to(device)
        real = x[torch.randint(len(x), (config.encoder_batch,), generator=gen)].to(device)
        latent_error = (encoder(generator(z)) - z).pow(2).sum(1).mean()
        reconstruction = (generator(encoder(real)) - real).pow(2).flatten(1).sum(1).mean()
        loss = latent_error + config.reconstruction_weight * reconstruction
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append((latent_error.item(), reconstruction.item()))
    proposal.eval()
    return history


@torch.no_grad()
def fids_along_chain(
    kernel, state, noise: Noise, space: FeatureSpace, steps: tuple[int, ...]
) -> dict[str, Any]:
    """One chain run to max(steps); FID and acceptance rate so far at each K in steps.

    Rows still at a real start give their first proposal (`kernel.output`), so no
    real image is ever scored as a sample.
    """
    figures: dict[str, Any] = {}
    accepted = proposed = 0
    for step in range(1, max(steps) + 1):
        state, info = kernel.step(state, noise)
        accepted += int(info.is_accepted.sum())
        proposed += len(info.is_accepted)
        if step in steps:
            figures[f"k{step}"] = {
                "fid": space.fid(kernel.output(state)),
                "acceptance_rate": round(accepted / proposed, 4),
            }
    return figures


def imh_fids(
    generator: nn.Module,
    log_ratio,
    starts: torch.Tensor,
    space: FeatureSpace,
    config: Config,
    seed: int,
) -> dict[str, Any]:
    """Independent MH from held-out real starts (MH-GAN's choice)."""
    kernel = imh.build(proposals.independent(generator, config.latent_dim), log_ratio)
    noise = Noise.seeded(seed, rows=len(starts), device=starts.device)
    state = imh.init_real(starts, log_ratio)
    return fids_along_chain(kernel, state, noise, space, config.check_steps)


def markov_fids(
    proposal: Proposal,
    pair: nn.Module,
    starts: torch.Tensor,
    space: FeatureSpace,
    config: Config,
    seed: int,
) -> dict[str, Any]:
    """Markov chains with the learned proposal, from generator samples and real starts."""
    kernel = markov.build(proposals.conditional(proposal, config.latent_dim), pair)
    figures: dict[str, Any] = {}
    for init in ("generator", "real"):
        noise = Noise.seeded(seed, rows=len(starts), device=starts.device)
        if init == "real":
            state = markov.init_real(starts)
        else:
            independent = proposals.independent(proposal.generator, config.latent_dim)
            state = markov.init_generator(independent, noise)
        figures[f"from_{init}"] = fids_along_chain(kernel, state, noise, space, config.check_steps)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=STORE)
    args = parser.parse_args(argv)
    config = Config()
    device = default_device()
    torch.set_num_threads(1)  # small nets gain little from more; one thread is repeatable
    started = time.perf_counter()

    split = load_digits_split()
    x_train, y_train = torch.tensor(split.x_train), torch.tensor(split.y_train)
    x_test, y_test = torch.tensor(split.x_test), torch.tensor(split.y_test)

    # 1. Classifier and the feature space of every FID here.
    classifier = train_classifier(config, x_train, y_train, device)
    with torch.no_grad():
        accuracy = (classifier(x_test.to(device)).argmax(1).cpu() == y_test).float().mean()
    accuracy = round(accuracy.item(), 4)
    space = FeatureSpace(classifier, x_test.to(device))
    train_fid = space.fid(x_train.to(device))
    print(f"classifier held-out accuracy {accuracy}; FID(train split vs held-out) {train_fid}")
    _lap(started, "classifier")

    # 2. The GAN, deliberately short.
    generator, gan_discriminator = train_gan(config, x_train, device)
    fid_latents = torch.randn(config.fid_samples, config.latent_dim, generator=_gen(12))
    with torch.no_grad():
        raw_fid = space.fid(generator(fid_latents.to(device)))
        calibration_fake = generator(
            torch.randn(config.calibration_fake, config.latent_dim, generator=_gen(21)).to(device)
        )
    print(f"raw generator FID {raw_fid} ({config.fid_samples} samples)")
    _lap(started, "GAN")
    # IMH chains start at held-out images, drawn with replacement to fid_samples rows.
    starts = x_test[torch.randint(len(x_test), (config.fid_samples,), generator=_gen(3))]
    starts = starts.to(device)

    # 3. Sample discriminators: post-hoc for the frozen G, and the GAN's own.
    torch.manual_seed(config.seed + 10)  # initial weights
    posthoc = ConvDiscriminator(1, 8, 64)
    history = train_posthoc(
        posthoc.to(device),
        generator,
        x_train,
        latent_dim=config.latent_dim,
        loss="bce",
        steps=(config.posthoc_steps,),
        lrs=(config.posthoc_lr,),
        batch_size=config.posthoc_batch,
        seed=config.seed + 100,
        device=device,
    )
    best_imh_fid = raw_fid
    for name, discriminator, training in (
        (
            "digits-d",
            posthoc,
            {
                "loss": "bce",
                "steps": config.posthoc_steps,
                "lr": config.posthoc_lr,
                "batch_size": config.posthoc_batch,
                "final_loss": round(sum(history[-100:]) / 100, 4),
            },
        ),
        ("digits-d-gan", gan_discriminator, {"loss": "gan (non-saturating, R1 10)"}),
    ):
        calibrators, report = _calibrate(discriminator, x_test.to(device), calibration_fake)
        default = default_calibration(report)
        # The GAN's D: raw and its default calibration only (the full set costs minutes).
        checked = calibrators if name == "digits-d" else ("none", default)
        checks = {
            calibration: imh_fids(
                generator,
                lambda x, c=calibrators[calibration], d=discriminator: c(d(x)),
                starts,
                space,
                config,
                seed=config.seed + 5,
            )
            for calibration in checked
        }
        best_imh_fid = min([best_imh_fid] + [f["fid"] for c in checks.values() for f in c.values()])
        print(f"{name}: calibration ECE {ece_summary(report)}; default {default}")
        for calibration, figures in checks.items():
            print(f"  imh ({calibration}) FID:", {k: v["fid"] for k, v in figures.items()})
        write_model(
            args.store,
            name,
            {
                "kind": "discriminator",
                "config": {"channels": 1, "size": 8, "width": 64},
                "description": {
                    "digits-d": "digits: post-hoc BCE discriminator for the frozen generator",
                    "digits-d-gan": "digits: the GAN's own final discriminator",
                }[name],
                "generator": "digits",
                "input": "sample",
                "output": "logit",
                "default_calibration": default,
                "training": training,
                "metrics": {
                    "calibration_ece": ece_summary(report),
                    "raw_generator_fid": raw_fid,
                    "imh_fid_from_real_starts": checks,
                },
            },
            discriminator,
            calibration=(calibrators, report),
        )

    _lap(started, "discriminators")

    # 4. The learned Markov proposal and its pair discriminator.
    torch.manual_seed(config.seed + 20)  # the encoder's initial weights
    proposal = Proposal(config.latent_dim, config.width, 64, config.rho).to(device)
    proposal.generator.load_state_dict(generator.state_dict())
    encoder_history = train_encoder(config, proposal, x_train, device)
    _lap(started, "encoder")
    latent_error, reconstruction = np.mean(encoder_history[-100:], axis=0)
    torch.manual_seed(config.seed + 30)
    pair = PairDiscriminator(64, config.pair_width, config.pair_depth, b=1e-3)

    def propose(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return proposal(x, torch.randn(len(x), config.latent_dim, generator=gen, device=x.device))

    pair_history = train_pair_discriminator(
        pair,
        propose,
        x_train,
        steps=config.pair_steps,
        batch_size=config.pair_batch,
        lr=config.pair_lr,
        seed=config.seed + 400,
        device=device,
        progress=True,
    )
    pair.eval()
    _lap(started, "pair discriminator")
    markov_checks = markov_fids(proposal, pair, starts, space, config, seed=config.seed + 6)
    for init, figures in markov_checks.items():
        print(f"digits-pair markov {init} FID:", {k: v["fid"] for k, v in figures.items()})
    write_model(
        args.store,
        "digits-proposal",
        {
            "kind": "proposal",
            "config": {
                "latent_dim": config.latent_dim,
                "width": config.width,
                "encoder_width": 64,
                "rho": config.rho,
            },
            "description": "digits: q(x | y) = G(sqrt(1 - rho^2) E(y) + rho xi), E inverts G",
            "generator": "digits",
            "noise_dim": config.latent_dim,
            "training": {
                "steps": config.encoder_steps,
                "latent_error": round(float(latent_error), 4),
                "reconstruction_error": round(float(reconstruction), 4),
            },
        },
        proposal,
    )
    write_model(
        args.store,
        "digits-pair",
        {
            "kind": "discriminator",
            "config": {
                "input_dim": 64,
                "width": config.pair_width,
                "depth": config.pair_depth,
                "b": 1e-3,
            },
            "description": "digits: pair discriminator for the digits-proposal Markov chain",
            "generator": "digits",
            "input": "pair",
            "output": "log_d",
            "proposal": "digits-proposal",
            "training": {
                "loss": "implicit_mh_pair",
                "steps": config.pair_steps,
                "lr": config.pair_lr,
                "batch_size": config.pair_batch,
                "final_loss": round(sum(pair_history[-100:]) / 100, 4),
            },
            "metrics": {"raw_generator_fid": raw_fid, "markov_fid": markov_checks},
        },
        pair,
    )

    # 5. The feature extractor and the generator (with its reference statistics).
    write_model(
        args.store,
        "digits-features",
        {
            "kind": "features",
            "config": {
                "width": config.classifier_width,
                "feature_dim": config.feature_dim,
                "classes": 10,
            },
            "description": "digits: penultimate layer of a small conv digit classifier (FID)",
            "feature_dim": config.feature_dim,
            "input_shape": [1, 8, 8],
            "metrics": {"held_out_accuracy": accuracy, "fid_train_split_vs_held_out": train_fid},
        },
        _as_features(classifier, config),
    )
    folder = write_model(
        args.store,
        "digits",
        {
            "kind": "generator",
            "config": {"latent_dim": config.latent_dim, "width": config.width},
            "description": "sklearn 8x8 digits: small DCGAN generator, deliberately short",
            "latent_dim": config.latent_dim,
            "sample_shape": [1, 8, 8],
            "image": True,
            "value_range": [0.0, 1.0],
            "discriminator": "digits-d",
            "real_samples": "real.safetensors",
            "reference_stats": "reference.npz",
            "features": "digits-features",
            "training": asdict(config) | {"device": str(device), "command": COMMAND},
            "metrics": {
                "raw_generator_fid": raw_fid,
                "best_imh_fid": best_imh_fid,
                "fid_train_split_vs_held_out": train_fid,
                "fid_samples": config.fid_samples,
            },
        },
        generator,
        tensors={"real.safetensors": {"x": x_test}},
    )
    save_stats(folder / "reference.npz", space.mu, space.sigma)
    print(f"wrote {args.store}/digits* in {time.perf_counter() - started:.0f} s")


COMMAND = ".venv/bin/python -m zoo.train_digits"


def _lap(started: float, stage: str) -> None:
    print(f"[{time.perf_counter() - started:.0f} s] {stage} done")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def _calibrate(
    discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor
) -> tuple[dict[str, Calibrator], dict[str, Any]]:
    from discriminators.calibration import fit_and_report

    return fit_and_report(discriminator(real).cpu(), discriminator(fake).cpu(), seed=0)


def _as_features(classifier: DigitClassifier, config: Config) -> DigitFeatures:
    features = DigitFeatures(config.classifier_width, config.feature_dim)
    features.load_state_dict(classifier.state_dict())
    return features.eval()


if __name__ == "__main__":
    main()
