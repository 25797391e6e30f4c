"""Redis goes away under load and comes back: readiness follows it, no job is lost.

A private redis-server with an append-only file (as production Redis must run) is
stopped while jobs run and started again on the same port and data directory.
"""

from __future__ import annotations

import time

import httpx

from tests.conftest import RedisProcess, start_server, stop_server
from tests.distributed.test_cluster import cluster_env, generate, result_samples, wait_job
from tests.service.conftest import JOB_OWNER


def poll(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def ready_status(client: httpx.Client) -> int:
    try:
        return client.get("/readyz").status_code
    except httpx.TransportError:
        return 0


def test_readiness_follows_redis_and_accepted_jobs_survive_a_restart(tmp_path):
    redis = RedisProcess(tmp_path).start()
    env = cluster_env(redis.url)
    worker = start_server(env, tmp_path / "worker.log", command="worker")
    api = start_server(env, tmp_path / "api.log")
    client = httpx.Client(base_url=api.url, timeout=30.0, headers=JOB_OWNER)
    try:
        jobs = [generate(client, seed=seed, n=4000) for seed in range(3)]
        poll(lambda: client.get(f"/v1/jobs/{jobs[0]['id']}").json()["state"] == "running",
             30, "a job to start")  # fmt: skip

        redis.stop()
        poll(lambda: ready_status(client) == 503, 10, "/readyz to turn 503")
        assert client.get("/healthz").status_code == 200
        refused = client.post("/v1/sample", json={"generator": "toy25", "n": 4})
        assert refused.status_code == 503 and "Redis" in refused.json()["detail"]
        assert refused.headers["Retry-After"] == "1"
        assert client.post("/v1/jobs", json={"type": "generate", "generator": "toy25",
                                             "n": 10}).status_code == 503  # fmt: skip
        assert client.get("/metrics").status_code == 200

        redis.start()
        poll(lambda: ready_status(client) == 200, 30, "/readyz to recover")
        for job in jobs:
            done = wait_job(client, job["id"])
            assert done["state"] == "succeeded", done
            assert result_samples(client, job["id"]).shape == (4000, 2)
        sample = client.post("/v1/sample", json={"generator": "toy25", "n": 4, "seed": 1})
        assert sample.status_code == 200, sample.text
        assert worker.alive() and api.alive()
    finally:
        client.close()
        stop_server(api)
        stop_server(worker)
        redis.stop()
