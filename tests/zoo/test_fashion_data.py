"""The Fashion-MNIST loader reads gzip'd idx files; these tests write tiny ones themselves."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from zoo.data import (
    FASHION_MNIST_ENV,
    FashionMnistMissingError,
    fashion_mnist_dir,
    load_fashion_mnist,
    read_idx,
)


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_split(folder: Path, n_train: int = 6, n_test: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / f"{part}-images-idx3-ubyte.gz", images, 2051)
        write_idx(folder / f"{part}-labels-idx1-ubyte.gz", labels, 2049)
        arrays[part] = (images, labels)
    return arrays


def test_loads_images_in_the_unit_interval_and_labels(tmp_path):
    arrays = write_split(tmp_path)
    split = load_fashion_mnist(tmp_path)
    assert split.x_train.shape == (6, 1, 28, 28) and split.x_test.shape == (4, 1, 28, 28)
    assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int64
    np.testing.assert_allclose(split.x_train[:, 0] * 255, arrays["train"][0], atol=1e-4)
    np.testing.assert_array_equal(split.y_test, arrays["t10k"][1])
    assert split.x_test.min() >= 0 and split.x_test.max() <= 1
    assert not split.x_train.flags.writeable


def test_the_folder_comes_from_the_argument_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)
    assert fashion_mnist_dir() == Path("/usr/share/datasets/fashion-mnist")
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "env"))
    assert fashion_mnist_dir() == tmp_path / "env"
    assert fashion_mnist_dir(tmp_path / "arg") == tmp_path / "arg"
    (tmp_path / "env").mkdir()
    write_split(tmp_path / "env", n_train=3)
    assert load_fashion_mnist().x_train.shape[0] == 3


def test_missing_files_say_how_to_install_them(tmp_path):
    with pytest.raises(FashionMnistMissingError) as error:
        load_fashion_mnist(tmp_path)
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message and FASHION_MNIST_ENV in message
    assert isinstance(error.value, FileNotFoundError)


def test_a_wrong_magic_number_or_a_short_file_is_refused(tmp_path):
    labels = tmp_path / "labels.gz"
    write_idx(labels, np.zeros(5), 2049)
    with pytest.raises(ValueError, match="magic number 2049, expected 2051"):
        read_idx(labels, 2051)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(struct.pack(">IIII", 2051, 2, 28, 28) + bytes(100)))
    with pytest.raises(ValueError, match="header says"):
        read_idx(short, 2051)


def test_image_and_label_counts_must_agree(tmp_path):
    write_split(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3), 2049)
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        load_fashion_mnist(tmp_path)
