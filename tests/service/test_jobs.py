"""Batch jobs in embedded mode (no Redis server): the same API as distributed mode, run
by the API process's own worker over the in-process store."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from tests.service.conftest import metric


def wait(client, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def test_a_generate_job_runs_in_process_and_matches_its_seed(client):
    spec = {"type": "generate", "generator": "toy25", "method": "drs", "n": 5000, "seed": 7,
            "params": {"gamma_percentile": 90}}  # fmt: skip
    created = client.post("/v1/jobs", json=spec)
    assert created.status_code == 201, created.text
    assert created.headers["Location"] == f"/v1/jobs/{created.json()['id']}"
    job = wait(client, created.json()["id"])
    assert job["state"] == "succeeded" and job["progress"] == 1.0
    assert job["counts"]["shards"] == 2 and job["counts"]["items_done"] == 5000
    assert 0 < job["counts"]["acceptance_rate"] < 1
    samples = np.load(io.BytesIO(client.get(job["result"]).content), allow_pickle=False)
    assert samples.shape == (5000, 2) and samples.dtype == np.float32
    tensors = load_safetensors(
        client.get(job["result"], headers={"Accept": "application/x-safetensors"}).content
    )
    np.testing.assert_array_equal(tensors["samples"], samples)
    again = wait(client, client.post("/v1/jobs", json=spec).json()["id"])
    np.testing.assert_array_equal(np.load(io.BytesIO(client.get(again["result"]).content)), samples)
    listed = client.get("/v1/jobs", params={"state": "succeeded"}).json()["jobs"]
    assert {job["id"], again["id"]} <= {item["id"] for item in listed}
    assert metric(client, "imh_jobs", type="generate", state="succeeded") >= 2


def test_a_drs_filter_job_keeps_what_exact_rejection_keeps(client):
    candidates = np.random.default_rng(0).normal(0, 2, size=(2000, 2)).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, candidates)
    spec = {"type": "filter", "discriminator": "toy25-d", "method": "drs", "seed": 1}
    created = client.post("/v1/jobs", data={"job": json.dumps(spec)},
                          files={"candidates": ("c.npy", buffer.getvalue())})  # fmt: skip
    assert created.status_code == 201, created.text
    job = wait(client, created.json()["id"])
    assert job["state"] == "succeeded", job
    scores = np.load(io.BytesIO(client.get(job["result"], params={"array": "log_ratio"}).content))
    kept = np.load(io.BytesIO(client.get(job["result"]).content))
    from samplers.finite import drs_filter

    expected = drs_filter(scores.astype(np.float64), 1)
    np.testing.assert_array_equal(kept, np.flatnonzero(expected.accepted))
    assert job["counts"]["acceptance_rate"] == pytest.approx(expected.acceptance_rate)
    assert client.get(job["result"], params={"array": "nope"}).status_code == 422


def test_jobs_answer_bad_requests_with_4xx(client):
    assert (
        client.post("/v1/jobs", json={"type": "generate", "generator": "toy25"}).status_code == 422
    )
    assert client.post("/v1/jobs", json={"type": "generate", "generator": "nope", "n": 5}
                       ).status_code == 404  # fmt: skip
    too_many = client.post("/v1/jobs", json={"type": "generate", "generator": "toy25",
                                             "n": 10**9})  # fmt: skip
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"][-1] == "n"
    assert client.post("/v1/jobs", json={"type": "sort"}).status_code == 422
    assert client.post("/v1/jobs", content=b"{", headers={"content-type": "application/json"}
                       ).status_code == 422  # fmt: skip
    assert client.get("/v1/jobs/0123abcd").status_code == 404
    assert client.get("/v1/jobs/not-an-id").status_code == 422
    assert client.delete("/v1/jobs/0123abcd").status_code == 404


def test_a_deleted_job_is_cancelled_and_forgotten(client):
    spec = {"type": "generate", "generator": "toy25", "method": "imh", "n": 40000,
            "steps": 2000, "seed": 0}  # fmt: skip
    job = client.post("/v1/jobs", json=spec).json()
    assert client.get(f"/v1/jobs/{job['id']}/result").status_code == 409
    deleted = client.delete(f"/v1/jobs/{job['id']}")
    assert deleted.status_code == 200 and deleted.json()["state"] == "cancelled"
    for path in ("", "/result", "/events"):
        assert client.get(f"/v1/jobs/{job['id']}{path}").status_code == 404
    assert job["id"] not in [j["id"] for j in client.get("/v1/jobs").json()["jobs"]]
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 404


def test_imh_filter_writes_the_kept_candidates_with_indices_and_scores(client, tmp_path):
    from safetensors.numpy import load_file

    from service.cli.main import main

    candidates = np.random.default_rng(0).normal(size=(3000, 2)).astype(np.float32) * 2
    np.save(tmp_path / "c.npy", candidates)
    args = ["filter", str(tmp_path / "c.npy"), "-d", "toy25-d", "--seed", "0",
            "--url", str(client.base_url), "--quiet"]  # fmt: skip
    assert main(args) == 0
    kept = np.load(tmp_path / "c.kept.npy")
    indices = np.load(tmp_path / "c.kept.indices.npy")
    scores = np.load(tmp_path / "c.kept.scores.npy")
    assert 0 < len(kept) == len(indices) == len(scores) < len(candidates)
    np.testing.assert_array_equal(kept, candidates[indices])
    assert main([*args, "-o", str(tmp_path / "k.safetensors")]) == 0
    tensors = load_file(tmp_path / "k.safetensors")
    np.testing.assert_array_equal(tensors["candidates"], kept)
    np.testing.assert_array_equal(tensors["indices"], indices)
