"""What a hostile or careless client could do, each refused: one test per row of the
hardening review (row 11, the OpenAPI document, is test_openapi.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import zipfile

import httpx
import pytest
import torch

from service.errors import BadModelFile, UnsafeModelFile
from service.models.safe_files import check_pt2
from tests.service.conftest import ADMIN_TOKEN, JOB_OWNER, metric
from tests.service.test_models import program_bytes
from tests.service.test_safe_files import rewrite
from tests.service.toy_models import MLP, export, seeded


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "generator.pt2"
    torch.export.save(export(seeded(MLP, [2, 8, 2], (2,)), torch.randn(4, 2)), str(path))
    return path


def _retarget(name: str, data: bytes, target: str) -> bytes:
    if not name.endswith("models/model.json"):
        return data
    tree = json.loads(data)
    tree["graph_module"]["graph"]["nodes"][0]["target"] = target
    return json.dumps(tree).encode()


# 1: programs may call only pure tensor operators -------------------------------------


@pytest.mark.parametrize(
    "target",
    ["torch.ops.aten.from_file.default", "torch.ops.aten.empty.memory_format",
     "torch.ops.aten.set_.source_Storage", "torch.ops.prims.view_of.default"],
)  # fmt: skip
def test_a_program_that_reads_files_or_raw_memory_is_refused(program, tmp_path, target):
    bad = rewrite(program, tmp_path / "bad.pt2", lambda n, d: _retarget(n, d, target))
    with pytest.raises(UnsafeModelFile, match="not on the list"):
        check_pt2(bad, "bad.pt2")


def test_a_zip_that_inflates_to_a_huge_json_is_refused_unread(program, tmp_path):
    def inflate(name: str, data: bytes) -> bytes:
        return data + b" " * (100 * 2**20) if name.endswith("models/model.json") else data

    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(program) as old, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            new.writestr(info.filename, inflate(info.filename, old.read(info.filename)))
    assert bomb.stat().st_size < 2**20
    with pytest.raises(BadModelFile, match="unpacks to"):
        check_pt2(bomb, "bomb.pt2")


def test_a_manifest_cannot_ask_the_smoke_test_for_gigabytes(client, admin):
    manifest = {"kind": "generator", "format": "torch.export", "file": "g.pt2",
                "latent_dim": 2, "sample_shape": [65536, 65536]}  # fmt: skip
    files = [("manifest", ("manifest.json", json.dumps(manifest))), ("files", ("g.pt2", b"x"))]
    answer = client.post("/v1/models", data={"name": "huge"}, files=files, headers=admin)
    assert answer.status_code == 400 and "values is larger than" in answer.text


# 2: bodies are bounded while read; answers never echo much of the input -------------


def test_a_huge_body_is_refused_and_the_loop_keeps_answering(server):
    body = b'{"generator": "' + b"x" * (40 * 2**20) + b'"}'
    started = time.monotonic()
    answer = httpx.post(f"{server.url}/v1/sample", content=body, timeout=60,
                        headers={"content-type": "application/json"})  # fmt: skip
    assert answer.status_code == 413 and len(answer.content) < 1000
    assert time.monotonic() - started < 10
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_a_chunked_upload_over_the_limit_is_refused(server):
    def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="candidates"; filename="c"\r\n\r\n'
        for _ in range(600):  # 600 MiB in 1 MiB pieces, no Content-Length
            yield b" " * 2**20

    headers = {"content-type": "multipart/form-data; boundary=b"}
    try:
        answer = httpx.post(f"{server.url}/v1/jobs", content=chunks(), headers=headers,
                            timeout=120)  # fmt: skip
        assert answer.status_code == 413, answer.text
    except httpx.TransportError:
        pass  # the server answered 413 and closed the connection while we still sent
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_a_large_invalid_value_is_echoed_as_a_short_excerpt(client):
    answer = client.post("/v1/sample", json={"generator": "toy25", "n": "x" * 100_000})
    assert answer.status_code == 422 and len(answer.content) < 2000
    assert "characters" in answer.json()["detail"][0]["input"]


def test_the_body_limit_stops_reading_at_the_limit():
    from service.api.middleware import BodyLimits

    received = 0

    async def app(scope, receive, send):
        nonlocal received
        while True:
            message = await receive()
            received += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def main():
        limited = BodyLimits(app, json_bytes=1000, upload_bytes=10_000)
        chunks = [{"type": "http.request", "body": b"x" * 600, "more_body": True}] * 50
        statuses = []

        async def receive():
            return chunks.pop(0)

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        scope = {"type": "http", "method": "POST", "path": "/v1/sample", "headers": []}
        await limited(scope, receive, send)
        return statuses

    assert asyncio.run(main()) == [413] and received <= 1200  # one piece past, no more


# 3 and 4: text that cannot be encoded, JSON nested too deep --------------------------


@pytest.mark.parametrize("path", ["/v1/sample", "/v1/sample/stream", "/v1/jobs"])
def test_a_lone_surrogate_gets_a_4xx(client, path):
    body = '{"type": "generate", "generator": "\\ud800", "n": 1}'
    answer = client.post(path, content=body, headers={"content-type": "application/json"})
    assert 400 <= answer.status_code < 500, answer.text


def test_json_nested_too_deep_gets_a_4xx(client):
    deep = "[" * 100_000 + "]" * 100_000
    for path in ("/v1/sample", "/v1/jobs"):
        answer = client.post(path, content=deep, headers={"content-type": "application/json"})
        assert 400 <= answer.status_code < 500, (path, answer.text[:200])
    answer = client.post("/v1/jobs", data={"job": deep}, files={"candidates": ("c.npy", b"x")})
    assert 400 <= answer.status_code < 500, answer.text[:200]


# 6: work and answers are bounded -------------------------------------------------------


def test_work_beyond_the_caps_is_refused(client):
    job = {"type": "generate", "generator": "toy25", "n": 4096, "steps": 10_000,
           "method": "isir", "params": {"particles": 64}}  # fmt: skip
    answer = client.post("/v1/jobs", json=job)
    assert answer.status_code == 422 and "proposals" in answer.text
    request = {"generator": "toy25", "n": 4096, "steps": 10_000, "method": "isir",
               "params": {"particles": 64}}  # fmt: skip
    answer = client.post("/v1/sample", json=request)
    assert answer.status_code == 422 and "proposals" in answer.text


# 7: a job belongs to its token --------------------------------------------------------


def test_jobs_are_seen_and_cancelled_only_with_their_token(server, client):
    created = client.post("/v1/jobs", json={"type": "generate", "generator": "toy25", "n": 8})
    job_id = created.json()["id"]
    stranger = {"X-IMH-Job-Token": "someone-else-0123456789"}
    with httpx.Client(base_url=server.url) as other:
        assert other.get("/v1/jobs").json()["jobs"] == []
        assert other.get("/v1/jobs", headers=stranger).json()["jobs"] == []
        for call in (other.get, other.delete):
            assert call(f"/v1/jobs/{job_id}", headers=stranger).status_code == 403
        assert other.get(f"/v1/jobs/{job_id}/result").status_code == 403
        everything = other.get("/v1/jobs", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert job_id in [job["id"] for job in everything.json()["jobs"]]
    assert job_id in [job["id"] for job in client.get("/v1/jobs").json()["jobs"]]


def test_a_job_token_made_by_the_server_is_returned_once(server):
    with httpx.Client(base_url=server.url) as anonymous:
        created = anonymous.post(
            "/v1/jobs", json={"type": "generate", "generator": "toy25", "n": 4}
        )
        token = created.json()["token"]
        assert len(token) >= 24 and token != JOB_OWNER["X-IMH-Job-Token"]
        own = anonymous.get(f"/v1/jobs/{created.json()['id']}", headers={"X-IMH-Job-Token": token})
        assert own.status_code == 200 and "token" not in own.json()


# 8: a small request does not wait behind a big one -------------------------------------


def test_a_small_request_answers_while_a_big_one_runs(server, client):
    small = {"generator": "toy25", "n": 16, "steps": 20, "seed": 0}
    idle = min(_timed(client, small) for _ in range(3))
    big = {"generator": "toy25", "n": 4096, "steps": 10_000, "seed": 1}

    def run_big() -> None:  # gives up after a while: the server frees its chains
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(f"{server.url}/v1/sample", json=big, timeout=4)

    thread = threading.Thread(target=run_big)
    thread.start()
    try:
        time.sleep(0.5)  # the big request is stepping
        busy = min(_timed(client, small) for _ in range(3))
    finally:
        thread.join()
    assert busy < 3 * idle + 0.5, (idle, busy)


def _timed(client, body) -> float:
    started = time.monotonic()
    assert client.post("/v1/sample", json=body).status_code == 200
    return time.monotonic() - started


# 9: other sites and other hosts ------------------------------------------------------


def test_cross_site_posts_and_foreign_hosts_are_refused(server):
    form = {"job": json.dumps({"type": "filter", "discriminator": "toy25-d"})}
    answer = httpx.post(f"{server.url}/v1/jobs", data=form, files={"candidates": b"x"},
                        headers={"Origin": "https://evil.example"})  # fmt: skip
    assert answer.status_code == 403 and "cross-site" in answer.text
    same = httpx.post(f"{server.url}/v1/sample", json={"generator": "toy25", "n": 2},
                      headers={"Origin": server.url})  # fmt: skip
    assert same.status_code == 200
    rebound = httpx.get(f"{server.url}/v1/models", headers={"Host": "attacker.example"})
    assert rebound.status_code == 400
    assert httpx.get(f"{server.url}/healthz", headers={"Host": "10.0.0.7"}).status_code == 200
    assert "access-control-allow-origin" not in answer.headers


# 10: operations ------------------------------------------------------------------------


def test_built_in_models_are_protected_and_names_match_whole(client, admin):
    answer = client.delete("/v1/models/toy25/1", headers=admin)
    assert answer.status_code == 409 and "IMH_ALLOW_ZOO_DELETE" in answer.text
    manifest = {"kind": "features", "format": "torch.export", "file": "f.pt2", "feature_dim": 2}
    files = [("manifest", ("manifest.json", json.dumps(manifest))), ("files", ("f.pt2", b"x"))]
    answer = client.post("/v1/models", data={"name": "nlgan\n"}, files=files, headers=admin)
    assert answer.status_code == 400 and "must match" in answer.text


def test_a_deleted_model_leaves_the_store_and_metrics(client, admin, model_store):
    from tests.service.test_models import DISCRIMINATOR_MANIFEST, GENERATOR_MANIFEST, upload

    generator = program_bytes(seeded(MLP, [2, 8, 2], (2,)), torch.randn(4, 2))
    discriminator = program_bytes(seeded(MLP, [2, 8, 1]), torch.randn(4, 2))
    d_manifest = {**DISCRIMINATOR_MANIFEST, "generator": "goner"}
    assert upload(client, admin, "goner", GENERATOR_MANIFEST,
                  {"generator.pt2": generator}).status_code == 201  # fmt: skip
    assert upload(client, admin, "goner-d", d_manifest,
                  {"discriminator.pt2": discriminator}).status_code == 201  # fmt: skip
    assert client.post("/v1/sample", json={"generator": "goner", "n": 4}).status_code == 200
    assert metric(client, "imh_sample_requests_total", model="goner", method="imh",
                  outcome="ok") == 1  # fmt: skip
    for name in ("goner-d", "goner"):
        answer = client.delete(f"/v1/models/{name}/1", headers=admin)
        assert answer.status_code == 200 and answer.json()["files_removed"], answer.text
    assert not (model_store / "goner").exists() and not (model_store / "goner-d").exists()
    assert 'model="goner"' not in client.get("/metrics").text


def test_readiness_says_when_no_generator_is_loaded(tmp_path):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.settings import Settings

    app = create_app(Settings(zoo=False, model_store=tmp_path))
    with TestClient(app, base_url="http://127.0.0.1") as local:
        deadline = time.monotonic() + 30
        while "loading" in (answer := local.get("/readyz")).text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert answer.status_code == 503 and "no generator is loaded" in answer.json()["detail"]
