"""Feature extractors for FID: any (N, ...) -> (N, F) map with a known feature_dim.

- ModuleFeatures wraps a torch module, or one named layer of it (for digits, the
  penultimate layer of the digit classifier), and runs it in eval mode, in chunks,
  without gradients.
- FlattenFeatures uses the samples themselves (2-D toy points, raw pixels).
- load_inception gives pytorch-fid's InceptionV3, the network FID figures in papers
  use. pytorch-fid imports torchvision, which only works where it matches the installed
  torch (CUDA machines; not the CPU torch of this project's default install). It is
  imported here lazily, inside load_inception and inception_available, so
  `import evaluation` never touches torchvision or pytorch_fid.

Example:
    >>> import torch
    >>> features = ModuleFeatures(torch.nn.Linear(4, 3), feature_dim=3)
    >>> features(torch.zeros(5, 4)).shape
    torch.Size([5, 3])
"""

from __future__ import annotations

import math
import os
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlparse

import torch
from torch import nn

INCEPTION_EXTRA = "pip install 'imh-service[inception]'"


@runtime_checkable
class FeatureExtractor(Protocol):
    """Callable mapping a batch (N, ...) to a float tensor of features (N, feature_dim)."""

    feature_dim: int

    def __call__(self, samples: torch.Tensor) -> torch.Tensor: ...


class InceptionUnavailableError(RuntimeError):
    """pytorch-fid's InceptionV3 cannot be used on this machine (the message says why)."""


class ModuleFeatures:
    """A torch module (or one of its layers) as a FeatureExtractor.

    module: any nn.Module; its output (or the output of the submodule named `layer`,
    e.g. "features" or "body.3", captured with a forward hook) is flattened to (N, F).
    feature_dim: F; taken from `module.feature_dim` when not given. Inputs are moved to
    the module's device; features come back on that device as float32. The module runs
    in eval mode under torch.inference_mode, batch_size rows at a time, and its
    training flag is restored afterwards.
    """

    def __init__(
        self,
        module: nn.Module,
        feature_dim: int | None = None,
        *,
        layer: str | None = None,
        batch_size: int = 512,
    ) -> None:
        feature_dim = (
            feature_dim if feature_dim is not None else getattr(module, "feature_dim", None)
        )
        if feature_dim is None:
            raise ValueError("feature_dim is required when the module has no feature_dim attribute")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.module = module
        self.feature_dim = int(feature_dim)
        self.layer = layer
        self.batch_size = batch_size
        # Fails early, with torch's message, on a layer name the module does not have.
        self._target = module.get_submodule(layer) if layer else module

    @property
    def device(self) -> torch.device:
        parameter = next(self.module.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def __call__(self, samples: Any) -> torch.Tensor:
        samples = torch.as_tensor(samples).to(self.device)
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.inference_mode():
                chunks = [self._features(chunk) for chunk in samples.split(self.batch_size)]
        finally:
            self.module.train(was_training)
        if not chunks:
            return torch.empty(0, self.feature_dim, device=self.device)
        return torch.cat(chunks)

    def _features(self, chunk: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        hook = None
        if self.layer:
            hook = self._target.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            output = self.module(chunk)
        finally:
            if hook is not None:
                hook.remove()
        output = captured[0] if captured else output
        features = _flatten_rows(output)  # (n, F)
        assert features.shape[1] == self.feature_dim, (
            f"extractor gave {features.shape[1]} features, manifest says {self.feature_dim}"
        )
        return features


def _flatten_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N, prod(...)) float32, also for N = 0 (where reshape(N, -1) fails)."""
    return tensor.reshape(tensor.shape[0], math.prod(tensor.shape[1:])).float()


class FlattenFeatures:
    """The samples themselves as features: (N, ...) -> (N, prod(...)) float32."""

    def __init__(self, feature_dim: int) -> None:
        self.feature_dim = int(feature_dim)

    def __call__(self, samples: Any) -> torch.Tensor:
        samples = torch.as_tensor(samples)
        features = _flatten_rows(samples)  # (N, F)
        if features.shape[1] != self.feature_dim:
            raise ValueError(
                f"samples flatten to {features.shape[1]} features, not {self.feature_dim}"
            )
        return features


class InceptionFeatures:
    """pytorch-fid's InceptionV3 pool features, pytorch-fid's conventions.

    Images (N, 3, H, W) or grey (N, 1, H, W), values in [0, 1]; they are resized to
    299x299 inside the network. Feature maps of blocks below the final pool are
    average-pooled to (N, dims) as pytorch-fid does.
    """

    def __init__(self, network: nn.Module, dims: int, batch_size: int = 64) -> None:
        self.network = network
        self.feature_dim = dims
        self.batch_size = batch_size

    def __call__(self, images: Any) -> torch.Tensor:
        device = next(self.network.parameters()).device
        images = torch.as_tensor(images).float().to(device)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # grey to RGB, as PIL's convert("RGB")
        chunks = []
        with torch.inference_mode():
            for chunk in images.split(self.batch_size):
                maps = self.network(chunk)[0]  # (n, dims, h, w)
                if maps.shape[2:] != (1, 1):
                    maps = nn.functional.adaptive_avg_pool2d(maps, output_size=(1, 1))
                chunks.append(_flatten_rows(maps))  # (n, dims)
        return torch.cat(chunks) if chunks else torch.empty(0, self.feature_dim, device=device)


def _import_inception() -> Any:
    """pytorch_fid.inception, or InceptionUnavailableError saying why not."""
    try:
        import pytorch_fid.inception as inception
    except (ImportError, RuntimeError, OSError, AttributeError) as error:
        # A torchvision built for another torch fails with RuntimeError
        # ("operator torchvision::nms does not exist"), not ImportError.
        raise InceptionUnavailableError(
            f"pytorch-fid's InceptionV3 is unavailable: importing pytorch_fid failed "
            f"({type(error).__name__}: {error}). Install it on a machine whose torchvision "
            f"matches torch ({INCEPTION_EXTRA}), or use a domain feature extractor."
        ) from error
    return inception


def inception_weights_path() -> str:
    """Where torch.hub keeps pytorch-fid's FID Inception weights."""
    inception = _import_inception()
    filename = os.path.basename(urlparse(inception.FID_WEIGHTS_URL).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def inception_unavailable_reason() -> str | None:
    """None when load_inception() will work offline, else a sentence saying why not."""
    try:
        weights = inception_weights_path()
    except InceptionUnavailableError as error:
        return str(error)
    if not os.path.exists(weights):
        return (
            f"pytorch-fid is installed but its Inception weights are not at {weights}; "
            "nothing is downloaded at run time: copy them there, or call "
            "load_inception(allow_download=True) once."
        )
    return None


def inception_available() -> bool:
    """True when pytorch-fid imports (working torchvision) and its weights are cached."""
    return inception_unavailable_reason() is None


def load_inception(
    dims: int = 2048,
    *,
    device: str | torch.device | None = None,
    allow_download: bool = False,
) -> InceptionFeatures:
    """pytorch-fid's FID InceptionV3 as a FeatureExtractor of `dims` features.

    dims: 64, 192, 768 or 2048 (the standard FID uses 2048). device: defaults to cuda
    when available. Raises InceptionUnavailableError (a RuntimeError) with the reason
    when pytorch-fid or torchvision cannot be imported, or when the weights are not in
    the torch.hub cache and allow_download is False.
    """
    inception = _import_inception()
    if dims not in inception.InceptionV3.BLOCK_INDEX_BY_DIM:
        raise ValueError(
            f"dims must be one of {sorted(inception.InceptionV3.BLOCK_INDEX_BY_DIM)}, got {dims}"
        )
    if not allow_download:
        reason = inception_unavailable_reason()
        if reason is not None:
            raise InceptionUnavailableError(reason)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    network = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    return InceptionFeatures(network.eval().to(device), dims)
