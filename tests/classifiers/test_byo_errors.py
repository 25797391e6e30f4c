"""Uploaded classifiers and data the jobs refuse, each with its specific error."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch
from safetensors.numpy import save
from torch import nn

from classifiers.job_common import ClassifierSpec
from classifiers.lift import UnsupportedGraph, lift
from classifiers.sbn_job import SbnFitSettings, prepare_sbn_fit
from classifiers.sbp_job import check_sbp_prune, prepare_sbp_prune
from classifiers.upload_data import BadData, DataLimits, Dataset, read_dataset, split_held_out
from tests.classifiers.conftest import DIGITS_SPEC, export

# Graphs ---------------------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv1(x)))
        y = torch.relu(y + self.conv2(y))  # the residual add joins two activations
        return self.head(y.flatten(1))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x, extra):
        return self.linear(x.flatten(1)) + extra


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        return logits, logits.softmax(-1)


class Sorting(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        return self.linear(x.flatten(1).sort(dim=1).values)


def conv_head(**conv) -> nn.Sequential:
    layer = nn.Conv2d(1, 4, 3, **conv)
    with torch.no_grad():
        features = layer(torch.zeros(1, 1, 8, 8)).numel()
    return nn.Sequential(layer, nn.ReLU(), nn.Flatten(), nn.Linear(features, 10))


def mlp(*extra: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), *extra)


def test_a_residual_connection_is_refused_where_the_activation_branches():
    with pytest.raises(UnsupportedGraph) as error:
        lift(export(Residual()), [1, 8, 8])
    # relu feeds both conv2d_1 and the residual add
    assert error.value.node == "conv2d_1"
    assert "relu is used by several operations (conv2d_1, add)" in error.value.reason


def test_several_inputs_are_refused():
    model = TwoInputs().eval()
    example = (torch.rand(2, 1, 8, 8), torch.rand(2, 10))
    program = torch.export.export(model, example)
    with pytest.raises(UnsupportedGraph, match="takes 2 inputs") as error:
        lift(program, [1, 8, 8])
    assert error.value.node == "inputs"


def test_several_outputs_are_refused():
    with pytest.raises(UnsupportedGraph, match="returns 2 outputs") as error:
        lift(export(TwoOutputs()), [1, 8, 8])
    assert error.value.node == "output"


def test_an_unknown_operation_is_named():
    with pytest.raises(UnsupportedGraph, match="aten.sort") as error:
        lift(export(Sorting()), [1, 8, 8])
    assert error.value.node == "sort"


def test_inputs_that_are_neither_images_nor_vectors_are_refused():
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 10))
    with pytest.raises(UnsupportedGraph, match="only \\(N, C, H, W\\) images") as error:
        lift(export(model, (1, 8)), [1, 8])
    assert error.value.node == "input"


def test_a_manifest_shape_that_does_not_match_the_program_is_refused():
    with pytest.raises(UnsupportedGraph, match="does not match"):
        lift(export(mlp()), [1, 4, 16])


def test_a_program_exported_in_training_mode_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))
    program = torch.export.export(model.train(), (torch.rand(4, 1, 8, 8),))
    with pytest.raises(UnsupportedGraph, match="training mode"):
        lift(program, [1, 8, 8])


def test_a_final_softmax_is_refused_with_advice():
    with pytest.raises(UnsupportedGraph, match="log_softmax") as error:
        lift(export(mlp(nn.Softmax(dim=1))), [1, 8, 8])
    assert error.value.node == "softmax"


def test_sbn_fit_needs_batch_norm():
    with pytest.raises(UnsupportedGraph, match="no batch normalisation") as error:
        prepare_sbn_fit(export(mlp()), DIGITS_SPEC)
    assert error.value.node == "graph"


def test_the_outputs_must_match_the_manifest_classes():
    spec = ClassifierSpec((1, 8, 8), list(range(5)))
    with pytest.raises(UnsupportedGraph, match="10 scores per input; the manifest lists 5"):
        prepare_sbp_prune(export(mlp()), spec)


@pytest.mark.parametrize(
    "conv, reason",
    [
        ({"stride": 2}, "stride 1"),
        ({"padding": (1, 0)}, "equal padding"),
    ],
)
def test_sbp_prune_needs_block_shaped_convolutions(conv, reason):
    program = export(conv_head(**conv))
    lift(program, [1, 8, 8])  # liftable (fine for sbn-fit) ...
    with pytest.raises(UnsupportedGraph, match=reason) as error:  # ... but not prunable
        prepare_sbp_prune(program, DIGITS_SPEC)
    assert error.value.node == "conv2d"


def test_sbp_prune_refuses_a_shift_before_a_padded_convolution():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(144, 10),
    )  # fmt: skip
    with torch.no_grad():
        model[2].running_mean.fill_(0.5)
    with pytest.raises(UnsupportedGraph, match="zero-padded convolution") as error:
        prepare_sbp_prune(export(model), DIGITS_SPEC)
    assert error.value.node == "conv2d_1"


# Data -----------------------------------------------------------------------------------

LIMITS = DataLimits(max_bytes=1 << 20, max_rows=1000)


def digits_like(rows: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.random((rows, 1, 8, 8), dtype=np.float32), "y": np.arange(rows) % 10}


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def read(data: bytes, labelled: bool = True):
    return read_dataset(data, "train", input_shape=[1, 8, 8], classes=10,
                        value_range=(0.0, 1.0), limits=LIMITS, labelled=labelled)  # fmt: skip


def test_safetensors_and_npz_read_alike_and_split_reproducibly():
    arrays = digits_like()
    from_safetensors, from_npz = read(save(arrays)), read(npz(**arrays))
    assert torch.equal(from_safetensors.x, from_npz.x) and torch.equal(from_npz.y.long(),
                                                                       from_npz.y)  # fmt: skip
    ood = read(npz(x=arrays["x"]), labelled=False)
    assert ood.y is None and len(ood) == 40
    first, second = split_held_out(from_npz, 0.25, seed=3), split_held_out(from_npz, 0.25, seed=3)
    assert len(first[1]) == 10 and torch.equal(first[1].x, second[1].x)


def bad(**changes):
    arrays = {**digits_like(), **changes}
    return {key: value for key, value in arrays.items() if value is not None}


@pytest.mark.parametrize(
    "arrays, field, message",
    [
        (bad(x=np.zeros((40, 1, 4, 16), np.float32)), "train.x", "shape \\(N, 1, 8, 8\\)"),
        (bad(y=np.arange(40) % 10 + 1), "train.y", "must be in \\[0, 10\\)"),
        (bad(y=(np.arange(40) % 10).astype(np.float32)), "train.y", "must be integers"),
        (bad(y=np.arange(39) % 10), "train.y", "shape \\(40,\\)"),
        (bad(x=np.full((40, 1, 8, 8), np.nan, np.float32)), "train.x", "NaN"),
        (bad(x=np.full((40, 1, 8, 8), 255.0, np.float32)), "train.x", "outside the manifest"),
        (bad(y=None), "train.y", "missing"),
        (
            bad(x=np.zeros((1001, 1, 8, 8), np.float32), y=np.zeros(1001, np.int64)),
            "train.x",
            "at most 1000 rows",
        ),  # fmt: skip
    ],
    ids=[
        "shape",
        "label-range",
        "float-labels",
        "label-count",
        "nan",
        "value-range",
        "missing",
        "rows",
    ],  # fmt: skip
)
def test_bad_data_names_its_field(arrays, field, message):
    for data in (save(arrays), npz(**arrays)):
        with pytest.raises(BadData, match=message) as error:
            read(data)
        assert error.value.field == field


def promising_npz(rows: int) -> bytes:
    """An .npz whose headers promise `rows` rows but which holds only a few bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, descr, shape in (("x", "<f4", (rows, 1, 8, 8)), ("y", "<i8", (rows,))):
            member = io.BytesIO()
            header = {"descr": descr, "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(member, header)
            archive.writestr(f"{name}.npy", member.getvalue() + b"\0" * 16)
    return buffer.getvalue()


def test_sizes_are_checked_from_the_headers_before_reading():
    with pytest.raises(BadData, match="bytes, more than"):
        read(promising_npz(10**8))
    with pytest.raises(BadData, match="the file has"):
        read(b"\0" * (LIMITS.max_bytes + 1))


def test_pickled_and_unreadable_files_are_refused():
    objects = npz(x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(BadData, match="not a plain number type"):
        read(objects)
    with pytest.raises(BadData, match="not a safetensors or .npz file"):
        read(b"\x80\x04garbage that is no archive")


def test_sbn_settings_that_cannot_work_are_refused():
    with pytest.raises(BadData, match="at least 8 batches") as error:
        SbnFitSettings(batch_size=32).check(train_rows=100)
    assert error.value.field == "train"
    with pytest.raises(BadData) as error:
        SbnFitSettings(epochs=0).check(train_rows=1000)
    assert error.value.field == "epochs"


def test_jobs_need_labelled_training_and_held_out_data():
    program = export(mlp())
    labelled = Dataset(torch.rand(40, 1, 8, 8), torch.arange(40) % 10)
    unlabelled = Dataset(torch.rand(40, 1, 8, 8), None)
    with pytest.raises(BadData) as error:
        check_sbp_prune(program, DIGITS_SPEC, unlabelled)
    assert error.value.field == "train.y"
    with pytest.raises(BadData) as error:
        check_sbp_prune(program, DIGITS_SPEC, labelled, unlabelled)
    assert error.value.field == "held_out.y"
    blocks, train, held_out = check_sbp_prune(program, DIGITS_SPEC, labelled)
    assert (len(train), len(held_out)) == (32, 8)  # the default fifth is held out
