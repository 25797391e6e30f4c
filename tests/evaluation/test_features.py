import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from evaluation.features import (
    FeatureExtractor,
    FlattenFeatures,
    InceptionUnavailableError,
    ModuleFeatures,
    inception_available,
    inception_unavailable_reason,
    load_inception,
)

ROOT = Path(__file__).resolve().parents[2]

FAKE_INCEPTION = """
import torch
from torch import nn

FID_WEIGHTS_URL = "https://example.invalid/releases/pt_inception-test.pth"


class InceptionV3(nn.Module):
    BLOCK_INDEX_BY_DIM = {64: 0, 2048: 3}

    def __init__(self, output_blocks=(3,)):
        super().__init__()
        dims = {0: 64, 3: 2048}[output_blocks[0]]
        self.conv = nn.Conv2d(3, dims, kernel_size=1, bias=False)
        nn.init.constant_(self.conv.weight, 1.0)

    def forward(self, x):
        return [self.conv(x)]  # (n, dims, h, w): the adapter must pool and flatten
"""


def test_import_evaluation_never_imports_torchvision_or_pytorch_fid():
    code = (
        "import sys, evaluation\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('torchvision', 'pytorch_fid')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def fake_package(root: Path, inception_source: str, init_source: str = "") -> None:
    package = root / "pytorch_fid"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent(init_source))
    (package / "inception.py").write_text(textwrap.dedent(inception_source))


@pytest.fixture
def import_root(tmp_path, monkeypatch):
    """A sys.path entry for fake pytorch_fid packages, removed with them afterwards."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for name in ("pytorch_fid", "pytorch_fid.inception"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield root
    for name in ("pytorch_fid", "pytorch_fid.inception"):
        sys.modules.pop(name, None)


def test_inception_unavailable_when_pytorch_fid_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # makes the import fail
    assert not inception_available()
    with pytest.raises(InceptionUnavailableError, match="domain feature extractor"):
        load_inception()


def test_inception_unavailable_when_torchvision_is_broken(import_root):
    # What a torchvision built for another torch raises at import time.
    broken = 'raise RuntimeError("operator torchvision::nms does not exist")\n'
    fake_package(import_root, FAKE_INCEPTION, init_source=broken)
    assert not inception_available()
    with pytest.raises(InceptionUnavailableError, match="torchvision::nms"):
        load_inception()


def test_inception_needs_cached_weights_and_then_gives_pooled_features(import_root):
    fake_package(import_root, FAKE_INCEPTION)
    reason = inception_unavailable_reason()
    assert reason is not None and "pt_inception-test.pth" in reason
    with pytest.raises(InceptionUnavailableError, match="weights"):
        load_inception(64)

    weights = Path(torch.hub.get_dir()) / "checkpoints" / "pt_inception-test.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    assert inception_available()
    with pytest.raises(ValueError, match="dims"):
        load_inception(100)

    extractor = load_inception(64, device="cpu")
    grey = torch.rand(5, 1, 8, 8)
    features = extractor(grey)
    assert isinstance(extractor, FeatureExtractor) and extractor.feature_dim == 64
    assert features.shape == (5, 64)
    # Weights of ones over 3 repeated grey channels: every feature is 3 x the mean pixel.
    expected = 3 * grey.mean(dim=(1, 2, 3))
    torch.testing.assert_close(features, expected[:, None].expand(5, 64))


class SmallClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU())
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.dropout(self.body(x)))


def test_module_features_capture_a_named_layer_in_eval_mode():
    torch.manual_seed(0)
    classifier = SmallClassifier().train()
    extractor = ModuleFeatures(classifier, feature_dim=8, layer="body", batch_size=3)
    images = torch.rand(10, 1, 4, 4)
    features = extractor(images)
    assert features.shape == (10, 8)
    torch.testing.assert_close(features, classifier.body(images))
    assert classifier.training  # its mode is restored
    assert isinstance(extractor, FeatureExtractor)


def test_module_features_chunks_agree_with_one_pass():
    torch.manual_seed(1)
    classifier = SmallClassifier()
    images = torch.rand(11, 1, 4, 4)
    whole = ModuleFeatures(classifier, feature_dim=3, batch_size=100)(images)
    chunked = ModuleFeatures(classifier, feature_dim=3, batch_size=4)(images)
    torch.testing.assert_close(chunked, whole)
    assert ModuleFeatures(classifier, feature_dim=3)(images[:0]).shape == (0, 3)


def test_module_features_checks_its_feature_dim():
    with pytest.raises(ValueError, match="feature_dim"):
        ModuleFeatures(nn.Linear(4, 3))
    module = nn.Linear(4, 3)
    module.feature_dim = 3
    assert ModuleFeatures(module).feature_dim == 3
    with pytest.raises(AssertionError, match="manifest says 5"):
        ModuleFeatures(nn.Linear(4, 3), feature_dim=5)(torch.zeros(2, 4))
    with pytest.raises(AttributeError):
        ModuleFeatures(nn.Linear(4, 3), feature_dim=3, layer="missing")


def test_flatten_features_are_the_samples():
    samples = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(FlattenFeatures(12)(samples), samples.reshape(2, 12))
    assert FlattenFeatures(12)(samples[:0]).shape == (0, 12)
    with pytest.raises(ValueError, match="12"):
        FlattenFeatures(5)(samples)
