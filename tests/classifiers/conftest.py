"""A user's classifier for the bring-your-own tests: a LeNet-5-like network with batch
norm, trained for a few seconds on the digits split, and its torch.export program."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from classifiers.job_common import ClassifierSpec
from classifiers.upload_data import Dataset
from zoo.data import load_digits_split

DIGITS_SPEC = ClassifierSpec((1, 8, 8), list(range(10)), (0.0, 1.0))


def lenet5_bn(conv1: int = 20, conv2: int = 50, dense: int = 500) -> nn.Module:
    """conv-BN-ReLU-pool, conv-BN-ReLU, linear-BN-ReLU, dropout, linear: the user's class."""
    return nn.Sequential(
        nn.Conv2d(1, conv1, 3, padding=1),
        nn.BatchNorm2d(conv1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(conv1, conv2, 3, padding=1),
        nn.BatchNorm2d(conv2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(conv2 * 16, dense),
        nn.BatchNorm1d(dense),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(dense, 10),
    )


def train(make: Callable[[], nn.Module], data: Dataset, epochs: int, seed: int = 0) -> nn.Module:
    """A network from `make()` trained with Adam at batch 32, all seeded; eval mode."""
    torch.manual_seed(seed)
    model = make()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for first in range(0, len(data) - 31, 32):
            rows = order[first : first + 32]
            loss = F.cross_entropy(model(data.x[rows]), data.y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def export(model: nn.Module, input_shape=(1, 8, 8)) -> torch.export.ExportedProgram:
    example = torch.rand(4, *input_shape, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch")
    return torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))


@dataclass
class UserClassifier:
    module: nn.Module  # the user's own network (the service never sees this class)
    program: torch.export.ExportedProgram
    train: Dataset
    held_out: Dataset


@pytest.fixture(scope="session")
def digits() -> tuple[Dataset, Dataset]:
    split = load_digits_split()
    return (
        Dataset(torch.from_numpy(split.x_train.copy()), torch.from_numpy(split.y_train.copy())),
        Dataset(torch.from_numpy(split.x_test.copy()), torch.from_numpy(split.y_test.copy())),
    )


@pytest.fixture(scope="session")
def user_classifier(digits, one_torch_thread) -> UserClassifier:
    train_set, held_out = digits
    module = train(lenet5_bn, train_set, epochs=10)
    return UserClassifier(module, export(module), train_set, held_out)
