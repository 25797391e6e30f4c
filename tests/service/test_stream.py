"""POST /v1/sample/stream: server-sent events, NDJSON, running FID, disconnects."""

from __future__ import annotations

import json
import time

import httpx

from tests.service.conftest import metric


def sse_events(response: httpx.Response):
    """(event, data) pairs from a text/event-stream body."""
    event, data = None, []
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            data.append(line[len("data: ") :])
        elif not line and event is not None:
            yield event, json.loads("\n".join(data))
            event, data = None, []


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_sse_streams_samples_then_metrics_and_done(client):
    body = {"generator": "toy", "method": "imh", "n": 30, "steps": 200, "seed": 0,
            "params": {"chains": 4, "init": "generator"}}  # fmt: skip
    with client.stream("POST", "/v1/sample/stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response))
    names = [name for name, _ in events]
    assert names[-1] == "done" and names[0] == "samples" and "metrics" in names
    samples = [row for name, data in events if name == "samples" for row in data["samples"]]
    assert len(samples) == 30 and all(len(row) == 2 for row in samples)
    done = events[-1][1]
    assert done["n"] == 30 and done["mode"] == "stream" and done["proposals"] >= 30
    metrics = [data for name, data in events if name == "metrics"][-1]
    assert set(metrics) >= {"accepted", "proposals", "acceptance_rate", "proposals_per_second"}


def test_ndjson_streams_one_json_object_per_line_and_reports_running_fid(client):
    body = {"generator": "img", "method": "pcn", "n": 40, "steps": 100, "seed": 0,
            "params": {"chains": 8}}  # fmt: skip
    headers = {"Accept": "application/x-ndjson"}
    with client.stream("POST", "/v1/sample/stream", json=body, headers=headers) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1]["event"] == "done"
    assert sum(len(line["samples"]) for line in lines if line["event"] == "samples") == 40
    fid = [line["fid"] for line in lines if line["event"] == "metrics"][-1]
    assert fid is not None and fid >= 0
    assert metric(client, "imh_running_fid", model="img", method="pcn") == fid


def test_same_seed_streams_the_same_samples(client):
    body = {"generator": "toy", "method": "mala", "n": 20, "steps": 50, "seed": 9,
            "params": {"chains": 4}}  # fmt: skip
    runs = []
    for _ in range(2):
        with client.stream("POST", "/v1/sample/stream", json=body) as response:
            runs.append([data for name, data in sse_events(response) if name == "samples"])
    assert runs[0] == runs[1]


def test_a_client_that_disconnects_frees_its_chains(client, server):
    labels = {"model": "toy", "method": "pcn"}  # tests run one at a time: only this one's
    # Emitting every 200th step, 32 chains cannot reach n before their 10^4 steps run
    # out: left alone, the request would run for many seconds and end "ok".
    body = {"generator": "toy", "method": "pcn", "n": 4096, "steps": 10**4, "seed": 0,
            "params": {"chains": 32, "beta": 0.5, "thin": 200}}  # fmt: skip
    finished = metric(client, "imh_sample_requests_total", outcome="ok", **labels)
    with httpx.Client(base_url=server.url, timeout=30) as own:
        with own.stream("POST", "/v1/sample/stream", json=body) as response:
            assert response.status_code == 200, response.read()
            wait_until(lambda: metric(client, "imh_active_chains", **labels) == 32)
    wait_until(lambda: metric(client, "imh_active_chains", **labels) == 0)
    assert metric(client, "imh_sample_requests_total", outcome="cancelled", **labels) == 1
    assert metric(client, "imh_sample_requests_total", outcome="ok", **labels) == finished
    assert client.get("/healthz").status_code == 200


def test_fashion_streams_report_running_fid_in_its_fast_feature_space(client):
    # A stream emits accepted proposals only; fashion-d accepts a few in a hundred.
    body = {"generator": "fashion", "method": "imh", "n": 32, "steps": 2000, "seed": 0,
            "params": {"chains": 32}}  # fmt: skip
    headers = {"Accept": "application/x-ndjson"}
    with client.stream("POST", "/v1/sample/stream", json=body, headers=headers) as response:
        assert response.status_code == 200, response.read()
        lines = [json.loads(line) for line in response.iter_lines() if line]
    samples = [row for line in lines if line["event"] == "samples" for row in line["samples"]]
    assert len(samples) == 32 and len(samples[0]) == 1 and len(samples[0][0]) == 28
    fid = [line["fid"] for line in lines if line["event"] == "metrics"][-1]
    assert fid is not None and fid > 0
    assert metric(client, "imh_running_fid", model="fashion", method="imh") == fid
    names = {model["name"] for model in client.get("/v1/models").json()["models"]}
    assert {"fashion", "fashion-d", "fashion-d-gan", "fashion-features", "inception"} <= names
