"""The shipped 25-Gaussians models load from their manifests and behave as recorded."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from discriminators.calibration import load_calibration
from evaluation.toy25 import toy25_metrics, toy25_sample
from samplers import chain, imh, proposals
from samplers._core import Noise
from service.models.manifests import parse_manifest
from zoo import catalog

NAMES = ("toy25", "toy25-d", "toy25-d-imh", "toy25-d-gan", "toy25-pair")


@pytest.mark.parametrize("name", NAMES)
def test_toy25_manifest_is_valid_and_names_existing_files(name):
    folder = catalog.model_dir(name, "1")
    manifest = parse_manifest((folder / "manifest.json").read_text())
    assert manifest.format == "zoo" and manifest.description
    for file_name in manifest.files():
        assert (folder / file_name).is_file(), f"{name} lacks {file_name}"
        assert (folder / file_name).stat().st_size < 1_000_000, "zoo weights must stay small"
    if manifest.kind == "discriminator":
        assert manifest.generator == "toy25"


def test_toy25_generator_maps_latents_to_grid_points():
    manifest = catalog.read_manifest("toy25")
    assert manifest["latent_dim"] == 2 and manifest["sample_shape"] == [2]
    assert manifest["discriminator"] == "toy25-d"
    generator = catalog.load("toy25")
    x = generator(torch.randn(64, 2))
    assert x.shape == (64, 2)
    assert x.abs().max() < 4.0, "samples live in grid coordinates (means within [-2, 2])"


def test_toy25_raw_generator_is_visibly_imperfect_as_recorded():
    generator = catalog.load("toy25")
    with torch.no_grad():
        x = generator(torch.randn(10_000, 2, generator=torch.Generator().manual_seed(7)))
    metrics = toy25_metrics(x)
    recorded = catalog.read_manifest("toy25")["metrics"]["raw_generator"]
    assert metrics.high_quality_rate == pytest.approx(recorded["high_quality_rate"], abs=1e-3)
    assert 0.5 < metrics.high_quality_rate < 0.95, "off-mode samples must remain"
    assert metrics.jsd_from_uniform > 0.05, "mode masses must be uneven"


def test_toy25_real_samples_are_held_out_grid_points():
    x = load_file(str(catalog.model_dir("toy25") / "real.safetensors"))["x"]
    assert x.shape == (2048, 2)
    metrics = toy25_metrics(x)
    assert metrics.high_quality_rate > 0.99 and metrics.modes_covered == 25


@pytest.mark.parametrize("name", ("toy25-d", "toy25-d-imh", "toy25-d-gan"))
def test_toy25_discriminators_give_one_logit_per_row_and_carry_calibrations(name):
    manifest = catalog.read_manifest(name)
    discriminator = catalog.load(name)
    assert discriminator(torch.randn(5, 2)).shape == (5,)
    calibrators, report = load_calibration(catalog.model_dir(name) / manifest["calibration"])
    assert set(calibrators) >= {"none", "isotonic", "logistic", "beta"}
    assert manifest["default_calibration"] in calibrators
    assert report["none"]["ece"] >= 0.0


def test_calibrated_imh_with_the_default_discriminator_fixes_the_raw_generator():
    generator, discriminator = catalog.load("toy25"), catalog.load("toy25-d")
    manifest = catalog.read_manifest("toy25-d")
    calibrators, _ = load_calibration(catalog.model_dir("toy25-d") / manifest["calibration"])
    calibrator = calibrators[manifest["default_calibration"]]

    def log_ratio(x):
        return calibrator(discriminator(x))

    starts = load_file(str(catalog.model_dir("toy25") / "real.safetensors"))["x"]
    kernel = imh.build(proposals.independent(generator, 2), log_ratio)
    noise = Noise.seeded(0, rows=len(starts))
    result = chain.run_final(kernel, imh.init_real(starts, log_ratio), noise, 50)
    metrics = toy25_metrics(result.samples)
    assert metrics.high_quality_rate >= 0.95
    assert metrics.modes_covered == 25


def test_toy25_pair_discriminator_is_bounded_and_antisymmetric_in_its_log_ratio():
    manifest = catalog.read_manifest("toy25-pair")
    assert manifest["input"] == "pair" and manifest["output"] == "log_d"
    assert manifest["proposal"]["type"] == "gaussian" and manifest["proposal"]["scale"] > 0
    pair = catalog.load("toy25-pair")
    x, y = torch.randn(256, 2), torch.randn(256, 2)
    log_d = pair(x, y)
    assert log_d.shape == (256,)
    b = manifest["config"]["b"]
    assert (log_d <= 0).all() and (log_d >= torch.log(torch.tensor(b)) - 1e-5).all()
    # For a symmetric proposal the log ratio is a potential difference: antisymmetric,
    # and additive along a path x -> y -> z wherever d stays clear of its floor b.
    x, y, z = toy25_sample(3 * 256, torch.Generator().manual_seed(0)).chunk(3)

    def log_ratio(a, c):
        return pair(c, a) - pair(a, c)

    torch.testing.assert_close(log_ratio(x, y), -log_ratio(y, x))
    inside = (log_ratio(x, y).abs() < 2.5) & (log_ratio(y, z).abs() < 2.5)
    inside &= log_ratio(x, z).abs() < 2.5
    assert inside.sum() > 50
    torch.testing.assert_close(
        (log_ratio(x, y) + log_ratio(y, z))[inside], log_ratio(x, z)[inside], atol=0.05, rtol=0
    )
