"""Datasets the built-in models are trained and evaluated on; nothing is downloaded.

- toy25: the 25-Gaussians grid of MH-GAN, defined with its metrics in evaluation/toy25.py
  (`toy25_sample`, `TOY25_MEANS`, `TOY25_STD`).
- digits: scikit-learn's bundled 8x8 digits as 1x8x8 float32 images in [0, 1] (the
  package's values divided by 16), split once with the stratified split every model uses.
- fashion: Fashion-MNIST (Xiao et al. 2017, MIT licence) from the idx files of the Debian
  package dataset-fashion-mnist, as 1x28x28 float32 images in [0, 1] (bytes / 255); its
  own 60k train / 10k test split.

Example:
    >>> split = load_digits_split()
    >>> split.x_train.shape, split.x_test.shape
    ((1347, 1, 8, 8), (450, 1, 8, 8))
    >>> fashion = load_fashion_mnist()
    >>> fashion.x_train.shape, fashion.x_test.shape
    ((60000, 1, 28, 28), (10000, 1, 28, 28))
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

FASHION_MNIST_ENV = "IMH_FASHION_MNIST_DIR"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IDX_IMAGES_MAGIC = 2051  # idx3-ubyte: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # idx1-ubyte: unsigned bytes, 1 dimension


class FashionMnistMissingError(FileNotFoundError):
    """The Fashion-MNIST idx files are not where the loader looked (the message says how)."""


class DigitsSplit(NamedTuple):
    x_train: np.ndarray  # (n_train, 1, 8, 8) float32 in [0, 1]
    y_train: np.ndarray  # (n_train,) int64
    x_test: np.ndarray  # (n_test, 1, 8, 8) float32 in [0, 1]
    y_test: np.ndarray  # (n_test,) int64


@lru_cache(maxsize=1)
def load_digits_split() -> DigitsSplit:
    """The one digits split of the project: 75/25, stratified, random_state=0.

    GANs, discriminators and classifiers train on the train part only; calibration, FID
    reference statistics and held-out accuracy use the test part.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )
    for array in (x_train, x_test, y_train, y_test):
        array.setflags(write=False)
    return DigitsSplit(x_train, y_train, x_test, y_test)


class FashionSplit(NamedTuple):
    x_train: np.ndarray  # (60000, 1, 28, 28) float32 in [0, 1]
    y_train: np.ndarray  # (60000,) int64, indices into FASHION_MNIST_CLASSES
    x_test: np.ndarray  # (10000, 1, 28, 28) float32 in [0, 1]
    y_test: np.ndarray  # (10000,) int64


def fashion_mnist_dir(folder: str | os.PathLike[str] | None = None) -> Path:
    """`folder`, else $IMH_FASHION_MNIST_DIR, else the Debian package's folder."""
    if folder is not None:
        return Path(folder)
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def load_fashion_mnist(folder: str | os.PathLike[str] | None = None) -> FashionSplit:
    """Fashion-MNIST's own train/test split as read-only arrays (see `fashion_mnist_dir`).

    GANs, discriminators and the classifier train on the train part only; calibration,
    FID reference statistics, held-out accuracy and chain starts use the test part.
    Raises FashionMnistMissingError, saying how to install the files, when one is missing.
    """
    return _load_fashion_mnist(fashion_mnist_dir(folder).resolve())


@lru_cache(maxsize=2)
def _load_fashion_mnist(folder: Path) -> FashionSplit:
    arrays = []
    for part in ("train", "t10k"):
        images = read_idx(_idx_file(folder, f"{part}-images-idx3-ubyte.gz"), IDX_IMAGES_MAGIC)
        labels = read_idx(_idx_file(folder, f"{part}-labels-idx1-ubyte.gz"), IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise ValueError(f"{folder}/{part}: {len(images)} images but {len(labels)} labels")
        arrays += [(images[:, None] / np.float32(255)), labels.astype(np.int64)]
    for array in arrays:
        array.setflags(write=False)
    return FashionSplit(*arrays)


def _idx_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise FashionMnistMissingError(
            f"Fashion-MNIST file {path} is missing. Install the Debian package "
            f"(apt-get install dataset-fashion-mnist, which puts the files in "
            f"{FASHION_MNIST_DIR}) or set {FASHION_MNIST_ENV} to a folder holding "
            "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz."
        )
    return path


def read_idx(path: Path, magic: int) -> np.ndarray:
    """One gzip'd idx file of unsigned bytes: (n,) labels or (n, rows, cols) images.

    Header: a big-endian int32 magic number (2049 labels, 2051 images), then one
    big-endian int32 size per dimension; the bytes follow.
    """
    data = gzip.decompress(path.read_bytes())
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: idx magic number {found}, expected {magic}")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, data holds {len(data) - offset} bytes")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)
