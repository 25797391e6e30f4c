"""Datasets the built-in models are trained and evaluated on; nothing is downloaded.

- toy25: the 25-Gaussians grid of MH-GAN, defined with its metrics in evaluation/toy25.py
  (`toy25_sample`, `TOY25_MEANS`, `TOY25_STD`).
- digits: scikit-learn's bundled 8x8 digits as 1x8x8 float32 images in [0, 1] (the
  package's values divided by 16), split once with the stratified split every model uses.

Example:
    >>> split = load_digits_split()
    >>> split.x_train.shape, split.x_test.shape
    ((1347, 1, 8, 8), (450, 1, 8, 8))
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np


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
