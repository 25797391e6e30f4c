"""The shipped digits GAN models load from their manifests and behave as recorded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from architectures import build
from discriminators.calibration import load_calibration
from evaluation.frechet import frechet_distance
from evaluation.stats import load_stats
from service.models.manifests import parse_manifest
from zoo import catalog
from zoo.data import load_digits_split

NAMES = (
    "digits",
    "digits-d",
    "digits-d-gan",
    "digits-features",
    "digits-proposal",
    "digits-pair",
)


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


@pytest.mark.parametrize("name", NAMES)
def test_digits_manifest_is_valid_and_names_existing_files(name):
    folder = catalog.model_dir(name, "1")
    manifest = parse_manifest((folder / "manifest.json").read_text())
    assert manifest.format == "zoo" and manifest.description
    for file_name in manifest.files():
        assert (folder / file_name).is_file(), f"{name} lacks {file_name}"
        assert (folder / file_name).stat().st_size < 2_000_000, "zoo weights must stay small"
    if manifest.kind in ("discriminator", "proposal"):
        assert manifest.generator == "digits"


def test_digits_generator_makes_8x8_images_in_the_unit_interval():
    manifest = catalog.read_manifest("digits")
    assert manifest["sample_shape"] == [1, 8, 8] and manifest["image"] is True
    assert manifest["value_range"] == [0.0, 1.0]
    assert manifest["discriminator"] == "digits-d"
    assert manifest["features"] == "digits-features"
    generator = catalog.load("digits")
    with torch.no_grad():
        x = generator(torch.randn(32, manifest["latent_dim"]))
    assert x.shape == (32, 1, 8, 8)
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_digits_real_samples_are_the_held_out_split(split):
    x = load_file(str(catalog.model_dir("digits") / "real.safetensors"))["x"]
    np.testing.assert_array_equal(x.numpy(), split.x_test)


def test_digits_classifier_reaches_its_recorded_held_out_accuracy(split):
    manifest = catalog.read_manifest("digits-features")
    folder = catalog.model_dir("digits-features")
    weights = folder / manifest["weights"]
    classifier = build("zoo.digits:DigitClassifier", manifest["config"], weights)
    with torch.no_grad():
        predicted = classifier(torch.tensor(split.x_test)).argmax(1).numpy()
    accuracy = (predicted == split.y_test).mean()
    assert accuracy == pytest.approx(manifest["metrics"]["held_out_accuracy"], abs=1e-4)
    assert accuracy > 0.97


def test_digits_reference_stats_are_the_held_out_features_and_the_raw_fid_is_as_recorded(split):
    manifest = catalog.read_manifest("digits")
    mu, sigma = load_stats(catalog.model_dir("digits") / manifest["reference_stats"])
    features = catalog.load("digits-features")
    with torch.no_grad():
        held_out = features(torch.tensor(split.x_test)).double().numpy()
    feature_dim = catalog.read_manifest("digits-features")["feature_dim"]
    assert held_out.shape == (len(split.x_test), feature_dim)
    np.testing.assert_allclose(mu, held_out.mean(0), atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(held_out, rowvar=False), atol=1e-6)

    generator = catalog.load("digits")
    n = manifest["metrics"]["fid_samples"]
    latents = torch.randn(n, manifest["latent_dim"], generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        generated = features(generator(latents)).double().numpy()
    fid = frechet_distance(generated.mean(0), np.cov(generated, rowvar=False), mu, sigma)
    assert fid == pytest.approx(manifest["metrics"]["raw_generator_fid"], abs=0.05)
    floor = manifest["metrics"]["fid_train_split_vs_held_out"]
    assert fid > 5 * floor, "the raw generator must be visibly imperfect"


@pytest.mark.parametrize("name", ("digits-d", "digits-d-gan"))
def test_digits_discriminators_give_one_logit_per_image_and_carry_calibrations(name):
    manifest = catalog.read_manifest(name)
    discriminator = catalog.load(name)
    assert discriminator(torch.rand(4, 1, 8, 8)).shape == (4,)
    calibrators, _ = load_calibration(catalog.model_dir(name) / manifest["calibration"])
    assert manifest["default_calibration"] in calibrators


def test_posthoc_discriminator_tells_held_out_digits_from_generated_ones(split):
    generator, discriminator = catalog.load("digits"), catalog.load("digits-d")
    with torch.no_grad():
        latents = torch.randn(len(split.x_test), 16, generator=torch.Generator().manual_seed(1))
        fake = generator(latents)
        real_logit = discriminator(torch.tensor(split.x_test))
        fake_logit = discriminator(fake)
    # AUC: the chance that a held-out image outscores a generated one.
    auc = (real_logit[:, None] > fake_logit[None, :]).float().mean()
    assert auc > 0.8


def test_digits_proposal_and_pair_discriminator_work_together(split):
    manifest = catalog.read_manifest("digits-proposal")
    proposal, pair = catalog.load("digits-proposal"), catalog.load("digits-pair")
    assert catalog.read_manifest("digits-pair")["proposal"] == "digits-proposal"
    y = torch.tensor(split.x_test[:16])
    with torch.no_grad():
        x = proposal(y, torch.randn(16, manifest["noise_dim"]))
        log_d = pair(x, y)
    assert x.shape == (16, 1, 8, 8) and x.min() >= 0.0 and x.max() <= 1.0
    assert log_d.shape == (16,) and (log_d <= 0).all()
    # The proposal's generator is the digits generator itself.
    generator_weights = load_file(str(catalog.model_dir("digits") / "weights.safetensors"))
    for key, value in generator_weights.items():
        torch.testing.assert_close(proposal.state_dict()[f"generator.{key}"], value)
