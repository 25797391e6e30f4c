"""`imh worker`'s own HTTP app: probes and metrics only.

The worker holds the models and runs the engine for the API front ends (the worker
loop reads work from Redis, service/distributed/worker.py). On its own port it serves
GET /healthz (alive), /readyz (models loaded and Redis answering), /metrics (the
engine's batches and steps, shards, redeliveries, heartbeats). Several workers, on any
machines that reach Redis, share the work; one per GPU.
"""

from __future__ import annotations

from fastapi import FastAPI, Response, status
from fastapi.responses import JSONResponse

from service.metrics import CONTENT_TYPE
from service.runtime import Runtime
from service.settings import Settings


def create_worker_app(settings: Settings) -> FastAPI:
    if settings.redis_url is None:
        raise ValueError("imh worker needs IMH_REDIS_URL (or --redis-url)")
    runtime = Runtime(settings, role="worker")
    worker = runtime.worker

    app = FastAPI(
        title="imh-service worker",
        version="0.1.0",
        lifespan=runtime.lifespan(settings.worker_drain_s),
    )
    app.state.runtime = runtime

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        body = {"worker": worker.name, "models": len(runtime.registry.all()),
                "redis": "up" if worker.redis_ok else "down"}  # fmt: skip
        if not runtime.ready or not worker.redis_ok:
            detail = runtime.startup_error or (
                "loading models" if not runtime.ready else "Redis is unreachable"
            )
            return JSONResponse(
                {"status": "unavailable", "detail": detail, **body},
                status.HTTP_503_SERVICE_UNAVAILABLE,
            )
        return JSONResponse({"status": "ready", **body})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)

    return app
