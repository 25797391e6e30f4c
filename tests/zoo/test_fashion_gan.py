"""The shipped Fashion-MNIST models load from their manifests and behave as recorded.

Checks run on the 1000 test images the generator ships as chain starts (the first rows
of the test split); the accuracy check needs their labels, so it runs only where
Fashion-MNIST is installed. Everything runs on subsets so the file takes seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from architectures import build
from discriminators.calibration import load_calibration
from evaluation.stats import FeatureStats, load_stats
from service.models.manifests import parse_manifest
from zoo import catalog
from zoo.data import FashionMnistMissingError, load_fashion_mnist

NAMES = ("fashion", "fashion-d", "fashion-d-gan", "fashion-features")
WEIGHT_LIMIT = 5_000_000  # bytes per weights file: the zoo ships small models


@pytest.fixture(scope="module")
def shipped_real() -> torch.Tensor:
    manifest = catalog.read_manifest("fashion")
    return load_file(str(catalog.model_dir("fashion") / manifest["real_samples"]))["x"]


@pytest.fixture(scope="module")
def classifier():
    manifest = catalog.read_manifest("fashion-features")
    weights = catalog.model_dir("fashion-features") / manifest["weights"]
    return build("zoo.fashion:FashionClassifier", manifest["config"], weights)


@pytest.mark.parametrize("name", NAMES)
def test_fashion_manifest_is_valid_and_names_existing_small_files(name):
    folder = catalog.model_dir(name, "1")
    manifest = parse_manifest((folder / "manifest.json").read_text())
    assert manifest.format == "zoo" and manifest.description
    for file_name in manifest.files():
        assert (folder / file_name).is_file(), f"{name} lacks {file_name}"
    assert (folder / manifest.weights).stat().st_size < WEIGHT_LIMIT
    if manifest.kind == "discriminator":
        assert manifest.generator == "fashion" and manifest.input == "sample"


def test_fashion_generator_makes_28x28_images_in_the_unit_interval():
    manifest = catalog.read_manifest("fashion")
    assert manifest["sample_shape"] == [1, 28, 28] and manifest["image"] is True
    assert manifest["value_range"] == [0.0, 1.0]
    assert manifest["discriminator"] == "fashion-d"
    assert manifest["features"] == "fashion-features"
    generator = catalog.load("fashion")
    with torch.inference_mode():
        one = generator(torch.zeros(1, manifest["latent_dim"]))
        x = generator(torch.randn(16, manifest["latent_dim"]))
    assert x.shape == (16, 1, 28, 28) and x.min() >= 0.0 and x.max() <= 1.0
    # Batch norm runs on stored statistics: a row does not depend on its batch.
    with torch.inference_mode():
        again = generator(torch.cat([torch.zeros(1, manifest["latent_dim"]), x.new_ones(3, 64)]))
    torch.testing.assert_close(again[:1], one)


def test_fashion_real_samples_are_test_images_for_chain_starts(shipped_real):
    x = shipped_real
    assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32 and len(x) >= 500
    assert x.min() >= 0 and x.max() <= 1
    np.testing.assert_allclose((x * 255).numpy(), (x * 255).round().numpy(), atol=1e-3)


@pytest.mark.parametrize("name", ("fashion-d", "fashion-d-gan"))
def test_fashion_discriminators_give_one_logit_per_image_and_carry_calibrations(name):
    manifest = catalog.read_manifest(name)
    discriminator = catalog.load(name)
    with torch.inference_mode():
        assert discriminator(torch.rand(4, 1, 28, 28)).shape == (4,)
    calibrators, _ = load_calibration(catalog.model_dir(name) / manifest["calibration"])
    assert {"isotonic", "logistic", "beta"} <= set(calibrators)
    assert manifest["default_calibration"] in calibrators


def test_posthoc_discriminator_tells_real_images_from_generated_ones(shipped_real):
    manifest = catalog.read_manifest("fashion")
    generator, discriminator = catalog.load("fashion"), catalog.load("fashion-d")
    latents = torch.randn(500, manifest["latent_dim"], generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        real_logit, fake_logit = (
            discriminator(shipped_real[:500]),
            discriminator(generator(latents)),
        )
    auc = (real_logit[:, None] > fake_logit[None, :]).float().mean()  # P(real outscores fake)
    assert auc > 0.8


def test_fashion_features_record_a_test_accuracy_the_classifier_reaches(classifier):
    manifest = catalog.read_manifest("fashion-features")
    assert manifest["feature_dim"] == manifest["config"]["feature_dim"]
    recorded = manifest["metrics"]["test_accuracy"]
    assert recorded > 0.9
    try:
        split = load_fashion_mnist()
    except FashionMnistMissingError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")
    x, y = torch.tensor(split.x_test[:1000]), torch.tensor(split.y_test[:1000])
    with torch.inference_mode():
        accuracy = (classifier(x).argmax(1) == y).double().mean().item()
    assert accuracy == pytest.approx(recorded, abs=0.03)  # 1000 rows: sd about 0.008


def test_reference_stats_have_the_feature_shapes():
    manifest = catalog.read_manifest("fashion")
    folder = catalog.model_dir("fashion")
    feature_dim = catalog.read_manifest("fashion-features")["feature_dim"]
    mu, sigma = load_stats(folder / manifest["reference_stats"])
    assert mu.shape == (feature_dim,) and sigma.shape == (feature_dim, feature_dim)
    mu, sigma = load_stats(folder / manifest["inception_reference_stats"])
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    np.testing.assert_allclose(sigma, sigma.T)
    assert manifest["inception_features"] == "inception"
    assert manifest["inception_reference_rows"] <= 10_000


def test_fast_reference_stats_describe_test_images_not_generated_ones(shipped_real):
    manifest = catalog.read_manifest("fashion")
    reference = load_stats(catalog.model_dir("fashion") / manifest["reference_stats"])
    features = catalog.load("fashion-features")
    with torch.inference_mode():
        real = features(shipped_real).double().numpy()
    fid = FeatureStats.from_features(real).fid_to(reference)
    # 1000 of the test images: the sampling floor (about 7), far below the raw generator.
    assert fid < 0.1 * manifest["metrics"]["raw_generator_fid"]
    assert fid > 0  # and they are a subset, not the whole split
