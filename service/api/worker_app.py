"""`imh worker`: the process that holds the models and runs the engine for the API.

It reads work from Redis (service/distributed/worker.py) and serves only probes on its
own port: GET /healthz (alive), /readyz (models loaded and Redis answering), /metrics
(the engine's batches and steps, shards, redeliveries, heartbeats). Several workers,
on any machines that reach Redis, share the work; one per GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response, status
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from service.api.app import build_core, load_models
from service.batch.shards import ShardRunner
from service.batch.store import JobStore
from service.distributed.connection import Broker
from service.distributed.worker import Worker
from service.metrics import CONTENT_TYPE
from service.settings import Settings

log = logging.getLogger("imh.worker")


def create_worker_app(settings: Settings) -> FastAPI:
    if settings.redis_url is None:
        raise ValueError("imh worker needs IMH_REDIS_URL (or --redis-url)")
    metrics, registry, engine, sampling = build_core(settings)
    broker = Broker.connect(settings.redis_url, settings.redis_prefix)
    store = JobStore(broker, settings.job_ttl_s)
    worker = Worker(
        broker, settings, metrics, sampling, ShardRunner(store, sampling, registry, metrics), store
    )
    status_of = {"ready": False, "error": None}
    tasks: set[asyncio.Task] = set()

    async def start() -> None:
        try:
            await load_models(settings, registry)
        except Exception as error:  # noqa: BLE001 - report on /readyz
            status_of["error"] = f"loading models failed: {error}"
            log.exception("loading models failed")
            return
        pause = 0.2
        while True:  # Redis may come up after the worker
            try:
                await broker.ensure_groups()
                break
            except (RedisError, OSError) as error:
                log.warning("waiting for Redis: %s", error)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
        status_of["ready"] = True
        log.info("worker %s consuming", worker.name)
        await worker.run()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks.add(asyncio.create_task(start()))
        try:
            yield
        finally:
            await worker.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(engine.close)
            with contextlib.suppress(Exception):
                await broker.close()

    app = FastAPI(title="imh-service worker", version="0.1.0", lifespan=lifespan)
    app.state.worker = worker

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        body = {"worker": worker.name, "models": len(registry.all()),
                "redis": "up" if worker.redis_ok else "down"}  # fmt: skip
        if not status_of["ready"] or not worker.redis_ok:
            detail = status_of["error"] or ("loading models" if not status_of["ready"]
                                             else "Redis is unreachable")  # fmt: skip
            return JSONResponse(
                {"status": "unavailable", "detail": detail, **body},
                status.HTTP_503_SERVICE_UNAVAILABLE,
            )
        return JSONResponse({"status": "ready", **body})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
