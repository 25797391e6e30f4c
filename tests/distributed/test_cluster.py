"""Distributed mode end to end: a real redis-server, real `imh serve` and `imh worker`
processes, real HTTP.

One API front end and one long-lived worker serve the module; tests that kill a worker
start their own. Every module uses its own key prefix, so a shared Redis is safe.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import signal
import time

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import load as load_safetensors

from samplers.finite import mh_filter
from tests.conftest import Server, start_server, stop_server
from tests.service.conftest import JOB_OWNER

N_GENERATE = 12_000
STEPS = 150


def cluster_env(redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "IMH_REDIS_URL": redis_url,
        "IMH_REDIS_PREFIX": f"t{secrets.token_hex(4)}",
        "IMH_TORCH_THREADS": "1",
        "IMH_CLAIM_IDLE_S": "2",
        "IMH_HEARTBEAT_S": "0.5",
        "IMH_JOB_SHARD_ROWS": "500",
        "IMH_FILTER_SHARD_ROWS": "1000",
        "IMH_STREAM_LEASE_S": "5",
        "IMH_LOG_LEVEL": "warning",
        **extra,
    }


class Cluster:
    def __init__(self, env: dict[str, str], tmp_path, empty: bool = False):
        self.env, self.tmp = env, tmp_path
        self.workers: list[Server] = []
        self.worker()  # the API is ready only once a worker is alive: start one first
        # Without models the API never turns ready: wait until it says that is why.
        self.api = start_server(env, tmp_path / "api.log", wait_ready=not empty)
        self.client = httpx.Client(base_url=self.api.url, timeout=60.0, headers=JOB_OWNER)
        deadline = time.monotonic() + 60
        while empty and "no generator" not in self.client.get("/readyz").text:
            assert time.monotonic() < deadline, self.client.get("/readyz").text
            time.sleep(0.1)

    def worker(self, **extra: str) -> Server:
        log = self.tmp / f"worker-{len(self.workers)}.log"
        server = start_server({**self.env, **extra}, log, command="worker")
        self.workers.append(server)
        return server

    def close(self) -> None:
        self.client.close()
        for server in [self.api, *self.workers]:
            stop_server(server)


@pytest.fixture(scope="module")
def cluster(redis_url, tmp_path_factory):
    cluster = Cluster(cluster_env(redis_url), tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.close()


def wait_job(client: httpx.Client, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job still {job['state']}: {job}"
        time.sleep(0.1)


def generate(client: httpx.Client, seed: int, n: int = N_GENERATE) -> dict:
    spec = {"type": "generate", "generator": "toy25", "method": "imh", "n": n, "steps": STEPS,
            "seed": seed}  # fmt: skip
    answer = client.post("/v1/jobs", json=spec)
    assert answer.status_code == 201, answer.text
    return answer.json()


def result_samples(client: httpx.Client, job_id: str) -> np.ndarray:
    answer = client.get(f"/v1/jobs/{job_id}/result")
    assert answer.status_code == 200, answer.text
    return np.load(io.BytesIO(answer.content), allow_pickle=False)


def metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )  # fmt: skip


def sse(lines) -> list[tuple[str, str, dict]]:
    events, fields = [], {}
    for line in lines:
        if line:
            key, _, value = line.partition(": ")
            fields[key] = value
        elif fields:
            events.append((fields["id"], fields["event"], json.loads(fields["data"])))
            fields = {}
    return events


def test_sampling_goes_through_workers_and_matches_embedded_semantics(cluster):
    body = {"generator": "toy25", "method": "imh", "n": 64, "steps": 30, "seed": 5}
    first = cluster.client.post("/v1/sample", json=body)
    again = cluster.client.post("/v1/sample", json=body)
    assert first.status_code == 200, first.text
    assert first.json()["samples"] == again.json()["samples"]  # same seed, same samples
    assert len(first.json()["samples"]) == 64
    bad = cluster.client.post("/v1/sample", json={**body, "generator": "nope"})
    assert bad.status_code == 404
    ready = cluster.client.get("/readyz").json()
    assert ready["mode"] == "distributed" and ready["workers"] >= 1


def test_generate_job_completes_when_a_worker_is_killed_mid_job(cluster):
    doomed = cluster.worker()
    job = generate(cluster.client, seed=11)
    deadline = time.monotonic() + 60
    while True:  # kill once the job is under way on both workers
        state = cluster.client.get(f"/v1/jobs/{job['id']}").json()
        if state["counts"]["shards_done"] >= 3 and metric(doomed, "imh_worker_inflight") > 0:
            break
        assert state["state"] != "succeeded", "the job finished before the kill; make it longer"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(doomed.process.pid, signal.SIGKILL)
    doomed.process.wait()

    done = wait_job(cluster.client, job["id"])
    assert done["state"] == "succeeded", done
    assert done["counts"]["shards_done"] == done["counts"]["shards"] == N_GENERATE // 500
    samples = result_samples(cluster.client, job["id"])
    assert samples.shape == (N_GENERATE, 2)
    survivor = cluster.workers[0]
    assert metric(survivor, 'imh_redeliveries_total{stream="jobs"}') >= 1

    # The same job again, undisturbed: shard outputs are a function of (seed, shard), so a
    # lost, duplicated or misplaced shard would show up as a difference.
    rerun = wait_job(cluster.client, generate(cluster.client, seed=11)["id"])
    np.testing.assert_allclose(result_samples(cluster.client, rerun["id"]), samples, atol=1e-5)


def test_a_worker_drains_on_sigterm_and_hands_back_what_it_cannot_finish(cluster):
    draining = cluster.worker(IMH_WORKER_DRAIN_S="0.5")
    spec = {"type": "generate", "generator": "toy25", "method": "imh", "n": 1500,
            "steps": 1000, "seed": 5}  # fmt: skip
    job = cluster.client.post("/v1/jobs", json=spec).json()
    deadline = time.monotonic() + 60
    while metric(draining, "imh_worker_inflight") == 0:  # a long shard runs there
        assert time.monotonic() < deadline
        time.sleep(0.05)
    signalled = time.monotonic()
    draining.process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal: the conventional -15.
    assert draining.process.wait(timeout=20) in (0, -signal.SIGTERM)
    assert time.monotonic() - signalled < 10  # well within its grace period
    assert re.search(r"handed [12] running messages back", draining.log())

    done = wait_job(cluster.client, job["id"], timeout=300)
    assert done["state"] == "succeeded", done
    assert done["counts"]["shards_done"] == done["counts"]["shards"] == 3
    samples = result_samples(cluster.client, job["id"])
    rerun = wait_job(cluster.client, cluster.client.post("/v1/jobs", json=spec).json()["id"],
                     timeout=300)  # fmt: skip
    # Equal up to float rounding: a shard's rows may share their batches with other work.
    np.testing.assert_allclose(result_samples(cluster.client, rerun["id"]), samples, atol=1e-5)


def test_filter_job_returns_the_chain_s_indices_and_calibrated_scores(cluster):
    candidates_npy = cluster.client.post(
        "/v1/sample", json={"generator": "toy25", "method": "none", "n": 3500, "seed": 2,
                            "format": "npy"},
    ).content  # fmt: skip
    candidates = np.load(io.BytesIO(candidates_npy))
    spec = {"type": "filter", "discriminator": "toy25-d", "method": "imh", "chain_length": 50,
            "seed": 9}  # fmt: skip
    answer = cluster.client.post(
        "/v1/jobs", data={"job": json.dumps(spec)},
        files={"candidates": ("c.npy", candidates_npy, "application/octet-stream")},
    )  # fmt: skip
    assert answer.status_code == 201, answer.text
    job = wait_job(cluster.client, answer.json()["id"])
    assert job["state"] == "succeeded", job
    assert job["counts"]["shards"] == 4 and job["counts"]["items"] == 3500

    tensors = load_safetensors(
        cluster.client.get(
            f"/v1/jobs/{job['id']}/result", headers={"Accept": "application/x-safetensors"}
        ).content
    )
    assert set(tensors) == {"indices", "scores", "log_ratio", "final"}
    log_ratio = tensors["log_ratio"].astype(np.float64)

    # Scores are the calibrated discriminator's, computed here independently.
    from service.models.registry import ZOO_STORE, Registry
    from service.online.plan import calibrated_logit

    registry = Registry(torch.device("cpu"))
    registry.load_store(ZOO_STORE, "zoo")
    d = registry.get("toy25-d")
    expected = calibrated_logit(d, d.manifest.default_calibration)
    with torch.inference_mode():
        reference = expected(torch.from_numpy(candidates)).double().numpy()
    np.testing.assert_allclose(log_ratio, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tensors["scores"], 1 / (1 + np.exp(-reference)), atol=1e-6)

    chain = mh_filter(log_ratio, 50, 9)
    np.testing.assert_array_equal(tensors["indices"], np.flatnonzero(chain.accepted))
    np.testing.assert_array_equal(tensors["final"], chain.final)
    assert job["counts"]["accepted"] == len(tensors["indices"])
    assert job["counts"]["acceptance_rate"] == pytest.approx(chain.acceptance_rate)
    default = np.load(io.BytesIO(cluster.client.get(f"/v1/jobs/{job['id']}/result").content))
    np.testing.assert_array_equal(default, tensors["indices"])  # npy: the indices


def test_filter_job_rejects_bad_uploads_with_4xx(cluster):
    spec = json.dumps({"type": "filter", "discriminator": "toy25-d"})
    wrong_shape = io.BytesIO()
    np.save(wrong_shape, np.zeros((10, 3), np.float32))
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for content, words in [
        (wrong_shape.getvalue(), "shape"),
        (pickled.getvalue(), ".npy"),
        (b"not an array", ".npy"),
    ]:
        answer = cluster.client.post(
            "/v1/jobs", data={"job": spec}, files={"candidates": ("c.npy", content)}
        )
        assert answer.status_code == 422, answer.text
        assert words in answer.text
    answer = cluster.client.post("/v1/jobs", json=json.loads(spec))
    assert answer.status_code == 422 and "multipart" in answer.text


def test_job_events_resume_from_last_event_id_exactly_once(cluster):
    job = generate(cluster.client, seed=3, n=6000)
    url = f"/v1/jobs/{job['id']}/events"
    first = []
    with cluster.client.stream("GET", url) as stream:
        lines = stream.iter_lines()
        while len(first) < 3:
            first += _event_lines(lines)
    with cluster.client.stream("GET", url, headers={"Last-Event-ID": first[-1][0]}) as stream:
        resumed = sse(stream.iter_lines())
    everything = sse(cluster.client.get(url).iter_lines())
    assert [e[0] for e in first + resumed] == [e[0] for e in everything]
    assert everything[-1][2]["state"] == "succeeded"
    assert sum(e[1] == "progress" for e in everything) == 12  # one per shard, none twice


def test_sample_stream_resumes_on_another_connection_without_gaps(cluster):
    body = {"generator": "toy25", "method": "imh", "n": 3000, "steps": 400, "seed": 4,
            "params": {"chains": 64}}  # fmt: skip
    first = []
    with cluster.client.stream("POST", "/v1/sample/stream", json=body) as stream:
        assert stream.status_code == 200
        request_id = stream.headers["X-IMH-Request-Id"]
        lines = stream.iter_lines()
        while sum(e[1] == "samples" for e in first) < 2:
            first += _event_lines(lines)
    url = f"/v1/sample/stream/{request_id}"
    with cluster.client.stream("GET", url, headers={"Last-Event-ID": first[-1][0]}) as stream:
        resumed = sse(stream.iter_lines())
    everything = sse(cluster.client.get(url).iter_lines())
    assert [e[0] for e in first + resumed] == [e[0] for e in everything]
    assert everything[-1][1] == "done"
    samples = [s for e in everything if e[1] == "samples" for s in e[2]["samples"]]
    assert len(samples) == 3000 == everything[-1][2]["n"]


def _event_lines(lines) -> list[tuple[str, str, dict]]:
    """Read lines up to the end of the next event."""
    block = []
    for line in lines:
        block.append(line)
        if not line and len(block) > 1:
            break
    return sse(block)


def test_an_uploaded_model_reaches_the_workers_that_share_the_store(redis_url, tmp_path):
    from tests.service.test_models import (
        DISCRIMINATOR_MANIFEST,
        GENERATOR_MANIFEST,
        program_bytes,
        upload,
    )
    from tests.service.toy_models import MLP, seeded

    token = "a-long-enough-admin-token"
    env = cluster_env(redis_url, IMH_MODEL_STORE=str(tmp_path / "store"), IMH_ZOO="0",
                      IMH_ADMIN_TOKEN=token)  # fmt: skip
    small = Cluster(env, tmp_path, empty=True)
    try:
        admin = {"authorization": f"Bearer {token}"}
        generator = program_bytes(seeded(MLP, [2, 8, 2], (2,)), torch.randn(4, 2))
        discriminator = program_bytes(seeded(MLP, [2, 8, 1]), torch.randn(4, 2))
        for name, manifest, files in [
            ("mygan", GENERATOR_MANIFEST, {"generator.pt2": generator}),
            ("mygan-d", DISCRIMINATOR_MANIFEST, {"discriminator.pt2": discriminator}),
        ]:
            created = upload(small.client, admin, name, manifest, files)
            assert created.status_code == 201, created.text
        body = {"generator": "mygan", "n": 8, "steps": 5, "seed": 0}
        deadline = time.monotonic() + 20
        while (answer := small.client.post("/v1/sample", json=body)).status_code == 404:
            assert time.monotonic() < deadline, answer.text  # the worker loads it on notice
            time.sleep(0.1)
        assert answer.status_code == 200, answer.text
        assert answer.json()["stats"]["generator"] == "mygan:1"
        ready = small.client.get("/readyz")
        assert ready.status_code == 200, ready.text  # a generator now exists
        removed = small.client.delete("/v1/models/mygan-d/1", headers=admin)
        assert removed.status_code == 200
        gone = small.client.post("/v1/sample", json=body)  # the API no longer knows it
        assert gone.status_code in (404, 422), gone.text
    finally:
        small.close()
