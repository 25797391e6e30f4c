"""Bring-your-own classifiers end to end on a real server: a LeNet-5-like network with
batch norm, trained here on the digits and exported, is uploaded; sbn-fit and sbp-prune
jobs run on it with uploaded data; the results are new classifiers that predict, and
their reports equal the in-process classifiers/ implementation on the same data and
seeds. Bad uploads and graphs the rewrite cannot handle are refused before any work,
and nothing is registered."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import torch
from torch import nn

from classifiers.sbn_job import SbnFitSettings, run_sbn_fit
from classifiers.sbp_job import PruneSettings, run_sbp_prune
from classifiers.upload_data import Dataset
from tests.classifiers.conftest import DIGITS_SPEC, export, lenet5_bn, train
from tests.service.conftest import ADMIN_TOKEN
from zoo.data import load_digits_split

FAST_PRUNE = {"epochs": 10, "sbp_lr_factor": 100.0, "seed": 0}  # reaches the goals in ~15 s
MANIFEST = {
    "kind": "classifier", "format": "torch.export", "file": "classifier.pt2",
    "classes": list(range(10)), "input_shape": [1, 8, 8], "value_range": [0, 1],
}  # fmt: skip


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def program_file(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(export(module), buffer)
    return buffer.getvalue()


def upload(client, name: str, module: nn.Module):
    files = [("manifest", ("manifest.json", json.dumps(MANIFEST))),
             ("files", ("classifier.pt2", program_file(module)))]  # fmt: skip
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    return client.post("/v1/models", data={"name": name}, files=files, headers=admin)


def submit(client, spec: dict, **files: bytes):
    parts = {name: (f"{name}.npz", data) for name, data in files.items()}
    return client.post("/v1/jobs", data={"job": json.dumps(spec)}, files=parts)


def wait(client, job_id: str, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    split = load_digits_split()
    as_set = lambda x, y: Dataset(torch.from_numpy(x.copy()), torch.from_numpy(y.copy()))  # noqa: E731
    return as_set(split.x_train, split.y_train), as_set(split.x_test, split.y_test)


@pytest.fixture(scope="module")
def user_net(client, digits):
    module = train(lenet5_bn, digits[0], epochs=6)
    answer = upload(client, "mynet", module)
    assert answer.status_code == 201, answer.text
    return module


def files_of(digits) -> dict[str, bytes]:
    train_set, held_out = digits
    ood = 1.0 - held_out.x[:200]  # inverted digits: out of domain
    return {
        "data": npz(x=train_set.x.numpy(), y=train_set.y.numpy()),
        "heldout": npz(x=held_out.x.numpy(), y=held_out.y.numpy()),
        "ood": npz(x=ood.numpy()),
    }


def test_an_uploaded_classifier_predicts_like_a_zoo_one(client, user_net, digits):
    x = digits[1].x[:5]
    answer = client.post("/v1/classifiers/mynet/predict", json={"inputs": x.tolist()})
    assert answer.status_code == 200, answer.text
    labels = [p["label"] for p in answer.json()["predictions"]]
    assert labels == user_net(x).argmax(1).tolist()


def test_sbn_fit_job_makes_a_classifier_with_uncertainty(client, user_net, digits):
    spec = {"type": "sbn-fit", "classifier": "mynet", "seed": 0}
    created = submit(client, spec, **files_of(digits))
    assert created.status_code == 201, created.text
    job = wait(client, created.json()["id"])
    assert job["state"] == "succeeded", job
    assert job["output"].startswith("mynet-sbn:")
    expected = run_sbn_fit(
        export(user_net), DIGITS_SPEC, digits[0], digits[1], Dataset(1.0 - digits[1].x[:200], None),
        SbnFitSettings(seed=0),
    ).report  # fmt: skip
    for part in ("plain", "sbn"):
        for key in ("accuracy", "nll"):
            assert job["report"][part][key] == pytest.approx(expected[part][key], rel=1e-5)
    assert job["report"]["sbn"]["nll"] <= job["report"]["plain"]["nll"] * 1.05
    assert job["report"]["sbn"]["accuracy"] >= job["report"]["plain"]["accuracy"] - 0.01
    inputs = digits[1].x[:4].tolist()
    body = {"inputs": inputs, "samples": 16, "seed": 0}
    answer = client.post(f"/v1/classifiers/{job['output']}/predict", json=body).json()
    assert answer["uncertainty"] == "sbn"
    assert all(p["mutual_information"] >= 0 for p in answer["predictions"])


def test_sbp_prune_job_makes_a_smaller_program(client, user_net, digits):
    spec = {"type": "sbp-prune", "classifier": "mynet", **FAST_PRUNE}
    files = files_of(digits)
    del files["ood"]
    created = submit(client, spec, **files)
    assert created.status_code == 201, created.text
    job = wait(client, created.json()["id"])
    assert job["state"] == "succeeded", job
    expected = run_sbp_prune(
        export(user_net), DIGITS_SPEC, digits[0], digits[1], PruneSettings(**FAST_PRUNE),
        measure_speed=False,
    ).report  # fmt: skip
    assert job["report"]["sbp"]["units_after"] == expected["sbp"]["units_after"]
    metrics = job["report"]["metrics"]
    assert metrics["accuracy"] == pytest.approx(expected["metrics"]["accuracy"])
    assert metrics["flops_reduction"] >= 5 and metrics["error"] - metrics["original_error"] <= 0.01
    described = client.get(f"/v1/classifiers/{job['output']}").json()
    assert described["sbp"] is not None
    x = digits[1].x[:8].tolist()
    answer = client.post(f"/v1/classifiers/{job['output']}/predict", json={"inputs": x})
    assert answer.status_code == 200, answer.text


class Residual(nn.Module):
    """conv, then a residual add joining channels: sbp-prune cannot slice through it."""

    def __init__(self):
        super().__init__()
        self.conv, self.inner, self.head = (
            nn.Conv2d(1, 4, 3, padding=1),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.Linear(256, 10),
        )

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.head((y + torch.relu(self.inner(y))).flatten(1))


class NoNorm(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_bad_uploads_and_graphs_are_refused_and_nothing_is_registered(client, user_net, digits):
    for name, make in (("resnet-ish", Residual), ("no-norm", NoNorm)):
        assert upload(client, name, make().eval()).status_code == 201
    before = {m["name"] for m in client.get("/v1/models").json()["models"]}
    good = files_of(digits)
    x, y = digits[0].x.numpy(), digits[0].y.numpy()
    cases = [
        ({"type": "sbn-fit", "classifier": "no-norm"}, good, "classifier"),  # no batch norm
        ({"type": "sbp-prune", "classifier": "resnet-ish"}, good, "classifier"),  # residual add
        ({"type": "sbn-fit", "classifier": "mynet"}, {"data": npz(x=x[:, :, :4], y=y)}, "data"),
        ({"type": "sbn-fit", "classifier": "mynet"}, {"data": npz(x=x, y=y + 10)}, "data"),
        ({"type": "sbn-fit", "classifier": "mynet"}, {"data": npz(x=x * 5, y=y)}, "data"),
        ({"type": "sbn-fit", "classifier": "mynet"}, {"data": b"\x80\x04not a pickle"}, "data"),
        ({"type": "sbn-fit", "classifier": "mynet"}, {"heldout": good["heldout"]}, "data"),
        ({"type": "sbn-fit", "classifier": "mynet"}, {"data": good["data"], "candidates": b"x"},
         "candidates"),
        ({"type": "sbp-prune", "classifier": "nosuchnet"}, good, None),
    ]  # fmt: skip
    for spec, files, field in cases:
        answer = submit(client, spec, **files)
        assert answer.status_code in (404, 422), (spec, answer.text)
        if field is not None:
            assert answer.json()["detail"][0]["loc"][1] == field, answer.text
    assert {m["name"] for m in client.get("/v1/models").json()["models"]} == before
    assert client.get("/readyz").status_code == 200


def test_imh_sbn_fit_runs_the_job_and_prints_the_report(client, user_net, digits, tmp_path, capsys):
    from service.cli.main import main

    data = tmp_path / "data.npz"
    data.write_bytes(files_of(digits)["data"])
    code = main(["sbn-fit", "mynet", "--data", str(data), "--output", "mynet-cli",
                 "--url", str(client.base_url), "--quiet"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "new classifier mynet-cli:1" in printed and '"sbn"' in printed
    missing = main(["prune", "mynet", "--data", str(tmp_path / "nope.npz"), "--quiet"])
    assert missing == 2
