"""The FastAPI application: `create_app(settings)` mounts one router per resource.

Embedded mode (no IMH_REDIS_URL): the registry, the engine and its scheduler threads
live in this process, and an in-process worker runs batch jobs over an in-process store.
Distributed mode (IMH_REDIS_URL): this process is a stateless front end. It keeps the
registry to check requests and answer model questions, and sends the work to `imh
worker` processes over Redis (service/distributed/). Models load in the background
after start; /healthz answers at once and /readyz turns 200 when loading is done (and,
distributed, when Redis answers and a worker is alive).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import AppState
from service.api.routes import classifiers, health, jobs, models, sample
from service.batch.service import JobService
from service.batch.shards import ShardRunner
from service.batch.store import JobStore
from service.classifiers.service import ClassifierService
from service.distributed.connection import Broker, Health
from service.distributed.remote import RemoteSampling
from service.distributed.worker import Worker
from service.errors import InvalidRequest, ServiceError, status_of
from service.metrics import Metrics
from service.models.registry import ZOO_STORE, Registry
from service.online.engine import Engine, EngineConfig
from service.online.service import SamplingService
from service.settings import Settings, get_settings

log = logging.getLogger("imh.app")


def build_core(settings: Settings) -> tuple[Metrics, Registry, Engine, SamplingService]:
    """What runs the models, shared by API processes and workers."""
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)  # process-wide, like the setting
    metrics = Metrics()
    device = torch.device(settings.device)
    registry = Registry(device)
    engine = Engine(
        EngineConfig(
            max_batch_size=settings.max_batch_size,
            batch_wait_s=settings.batch_wait_s,
            max_queued_rows=settings.max_queued_rows,
            buffer_events=settings.stream_buffer_events,
            idle_s=settings.group_idle_s,
            device=device,
        ),
        metrics,
    )
    return metrics, registry, engine, SamplingService(registry, engine, settings, metrics)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics, registry, engine, local = build_core(settings)
    broker = Broker.connect(settings.redis_url, settings.redis_prefix)
    health_check = Health(broker)
    store = JobStore(broker, settings.job_ttl_s)
    distributed = settings.redis_url is not None
    sampling = RemoteSampling(local, broker, health_check, settings) if distributed else local
    state = AppState(settings, metrics, registry, engine, sampling)
    state.broker, state.health, state.distributed = broker, health_check, distributed
    state.jobs = JobService(store, registry, local, settings, metrics)
    worker = None
    if not distributed:  # batch jobs run in this process, on the in-process store
        runner = ShardRunner(store, local, registry, metrics)
        worker = Worker(broker, settings, metrics, local, runner, store, name="embedded")
        health_check.redis_up, health_check.workers, health_check.error = True, 1, None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        _spawn(state, _load_models(state, worker))
        if distributed:
            _spawn(state, health_check.run())
        try:
            yield
        finally:
            if worker is not None:
                await worker.stop(drain_s=2.0)
            for task in list(state.tasks):
                task.cancel()
            await asyncio.gather(*state.tasks, return_exceptions=True)
            await asyncio.to_thread(engine.close)
            with contextlib.suppress(Exception):
                await broker.close()

    app = FastAPI(
        title="imh-service",
        summary="Implicit Metropolis-Hastings post-processing for GANs",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.imh = state
    app.state.classifiers = ClassifierService(registry, settings, metrics)
    app.add_middleware(HttpMetrics, metrics=metrics)
    for router in (health.router, models.router, sample.router, jobs.router, classifiers.router):
        app.include_router(router)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        # The default handler echoes the input, and JSON has no NaN: print those as text.
        return JSONResponse({"detail": _finite(jsonable_encoder(error.errors()))}, 422)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        code = status_of(error)
        headers = {"Retry-After": "1"} if code == 503 else None
        if isinstance(error, InvalidRequest):
            detail = [{"loc": ["body", *error.field], "msg": error.message, "type": "value_error"}]
            return JSONResponse({"detail": detail}, code)
        return JSONResponse({"detail": error.message}, code, headers=headers)

    return app


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _spawn(state: AppState, work) -> None:
    task = asyncio.create_task(work)
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)


async def load_models(settings: Settings, registry: Registry) -> None:
    """The zoo (unless IMH_ZOO=0) and IMH_MODEL_STORE, off the event loop."""
    started = time.monotonic()
    if settings.zoo:
        await asyncio.to_thread(registry.load_store, ZOO_STORE, "zoo")
    await asyncio.to_thread(registry.load_store, settings.model_store.resolve(), "store")
    log.info(
        "%d models loaded in %.1fs, %d skipped",
        len(registry.all()), time.monotonic() - started, len(registry.load_errors),
    )  # fmt: skip


async def _load_models(state: AppState, worker: Worker | None = None) -> None:
    try:
        await load_models(state.settings, state.registry)
    except Exception as error:  # noqa: BLE001 - report on /readyz rather than die silently
        state.startup_error = f"loading models failed: {error}"
        log.exception("loading models failed")
        return
    if worker is not None:
        await state.broker.ensure_groups()
        _spawn(state, worker.run())
    state.ready = True


class HttpMetrics:
    """Counts answers and times them per route template (pure ASGI: streams pass through)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.http_requests.labels(route, str(status)).inc()
            self.metrics.http_duration.labels(route).observe(time.perf_counter() - started)
