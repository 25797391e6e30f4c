"""Bad input gets a clear 4xx naming the problem, and the server keeps serving."""

from __future__ import annotations

import pytest


def post(client, body=None, content=None):
    if content is not None:
        return client.post(
            "/v1/sample", content=content, headers={"content-type": "application/json"}
        )
    return client.post("/v1/sample", json=body)


def loc(response) -> list:
    return response.json()["detail"][0]["loc"]


@pytest.mark.parametrize(
    "body,field",
    [
        ({"generator": "toy", "n": 0}, "n"),
        ({"generator": "toy", "n": -3}, "n"),
        ({"generator": "toy", "n": 10**9}, "n"),
        ({"generator": "toy", "n": "ten"}, "n"),
        ({"generator": "toy", "n": 1.5}, "n"),
        ({"generator": "toy", "steps": 0}, "steps"),
        ({"generator": "toy", "steps": 10**7}, "steps"),
        ({"generator": "toy", "seed": -1}, "seed"),
        ({"generator": "toy", "method": "hmc"}, "method"),
        ({"generator": "toy", "format": "gif"}, "format"),
        ({"generator": "toy", "colour": "red"}, "colour"),
        ({"generator": "toy", "method": "pcn", "params": {"beta": 0}}, "beta"),
        ({"generator": "toy", "method": "pcn", "params": {"step_size": 0.1}}, "step_size"),
        ({"generator": "toy", "method": "mala", "params": {"step_size": -1}}, "step_size"),
        ({"generator": "toy", "method": "imh", "params": {"init": "zero"}}, "init"),
        (
            {"generator": "toy", "method": "drs", "params": {"gamma_percentile": 101}},
            "gamma_percentile",
        ),
        ({"generator": "toy", "method": "imh", "params": {"chains": 4}}, "chains"),
        ({"generator": "toy", "params": {"mode": "stream", "chains": 10**6}}, "chains"),
        ({"generator": "toy", "calibration": "platt"}, "calibration"),
        ({"generator": "toy", "discriminator": "toy-pair", "method": "imh"}, "discriminator"),
        ({"n": 3}, "generator"),
        ({"generator": "../etc/passwd"}, "generator"),
    ],
)
def test_out_of_range_or_unknown_values_get_a_422_naming_the_field(client, body, field):
    response = post(client, body)
    assert response.status_code == 422, response.text
    assert field in loc(response), response.json()


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(client, literal):
    raw = '{"generator": "toy", "method": "drs", "params": {"gamma": LITERAL}}'
    raw = raw.replace("LITERAL", literal)
    response = post(client, content=raw)
    assert response.status_code == 422 and "gamma" in loc(response)


@pytest.mark.parametrize("raw", ['{"generator": ', "[1, 2]", "null", "not json"])
def test_malformed_bodies_are_refused(client, raw):
    assert post(client, content=raw).status_code == 422


def test_unknown_models_are_404(client):
    assert post(client, {"generator": "nope"}).status_code == 404
    assert post(client, {"generator": "toy", "discriminator": "nope"}).status_code == 404
    assert post(client, {"generator": "toy-d"}).status_code == 404  # not a generator
    assert post(client, {"generator": "toy:7"}).status_code == 404


def test_a_generator_without_discriminator_needs_method_none(client):
    response = post(client, {"generator": "toy-zoo", "method": "imh"})
    assert response.status_code == 422 and "discriminator" in loc(response)


def test_stream_requests_are_checked_before_streaming(client):
    response = client.post("/v1/sample/stream", json={"generator": "toy", "format": "npy"})
    assert response.status_code == 422 and loc(response) == ["body", "format"]
    assert client.post("/v1/sample/stream", json={"generator": "nope"}).status_code == 404


def test_the_server_keeps_serving_after_bad_input(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert post(client, {"generator": "toy", "n": 2, "steps": 2}).status_code == 200
    assert client.get("/docs").status_code == 200
    assert "/v1/sample/stream" in client.get("/openapi.json").json()["paths"]


def in_process(app, method: str, path: str, **kwargs):
    """One request to an app in this process (its lifespan, and so model loading, not run)."""
    import asyncio

    import httpx

    async def call():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as local:
            return await local.request(method, path, **kwargs)

    return asyncio.run(call())


def test_not_ready_and_a_full_queue_answer_503_with_retry_after(tmp_path):
    from service.api.app import create_app
    from service.errors import QueueFull
    from service.settings import Settings

    app = create_app(Settings(zoo=False, model_store=tmp_path))
    body = {"generator": "toy"}
    loading = in_process(app, "POST", "/v1/sample", json=body)
    assert loading.status_code == 503 and loading.headers["retry-after"] == "1"
    assert in_process(app, "GET", "/readyz").status_code == 503

    async def full(*args, **kwargs):
        raise QueueFull("the scheduler queue is full (8192 rows waiting)")

    state = app.state.imh
    state.runtime.ready, state.runtime.backend.resolve = True, full
    response = in_process(app, "POST", "/v1/sample", json=body)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "queue is full" in response.json()["detail"]


def test_an_embedded_server_logs_no_redis_recovery(server):
    assert "Redis is reachable" not in server.log()  # embedded mode has no Redis to lose
