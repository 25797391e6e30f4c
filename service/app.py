"""The FastAPI application: `create_app(settings)` mounts one router per resource.

Embedded mode (no IMH_REDIS_URL): the registry, the engine and its scheduler threads
live in this process. Models load in the background after start; /healthz answers at
once and /readyz turns 200 when loading is done.
"""

from __future__ import annotations

import asyncio
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

from service.classifiers import ClassifierService
from service.deps import AppState
from service.engine import Engine, EngineConfig
from service.errors import (
    BadModelFile,
    EngineFailure,
    InvalidRequest,
    ModelConflict,
    ModelNotFound,
    NotReady,
    QueueFull,
    ServiceError,
    UnsafeModelFile,
)
from service.metrics import Metrics
from service.registry import ZOO_STORE, Registry
from service.routes import classifiers, health, models, sample
from service.sampling import SamplingService
from service.settings import Settings, get_settings

log = logging.getLogger("imh.app")

# Most specific first: UnsafeModelFile is a BadModelFile.
STATUS_BY_ERROR: list[tuple[type[ServiceError], int]] = [
    (InvalidRequest, 422),
    (ModelNotFound, 404),
    (ModelConflict, 409),
    (UnsafeModelFile, 415),
    (BadModelFile, 400),
    (QueueFull, 503),
    (NotReady, 503),
    (EngineFailure, 500),
]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
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
    state = AppState(
        settings, metrics, registry, engine, SamplingService(registry, engine, settings, metrics)
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.redis_url:
            log.warning(
                "IMH_REDIS_URL is set, but distributed mode is not available yet; running embedded"
            )
        task = asyncio.create_task(_load_models(state))
        state.tasks.add(task)
        try:
            yield
        finally:
            task.cancel()
            await asyncio.to_thread(engine.close)

    app = FastAPI(
        title="imh-service",
        summary="Implicit Metropolis-Hastings post-processing for GANs",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.imh = state
    app.state.classifiers = ClassifierService(registry, settings, metrics)
    app.add_middleware(HttpMetrics, metrics=metrics)
    for router in (health.router, models.router, sample.router, classifiers.router):
        app.include_router(router)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        # The default handler echoes the input, and JSON has no NaN: print those as text.
        return JSONResponse({"detail": _finite(jsonable_encoder(error.errors()))}, 422)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        code = next(code for kind, code in STATUS_BY_ERROR if isinstance(error, kind))
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


async def _load_models(state: AppState) -> None:
    settings, registry = state.settings, state.registry
    started = time.monotonic()
    try:
        if settings.zoo:
            await asyncio.to_thread(registry.load_store, ZOO_STORE, "zoo")
        await asyncio.to_thread(registry.load_store, settings.model_store.resolve(), "store")
    except Exception as error:  # noqa: BLE001 - report on /readyz rather than die silently
        state.startup_error = f"loading models failed: {error}"
        log.exception("loading models failed")
        return
    state.ready = True
    log.info(
        "ready: %d models loaded in %.1fs, %d skipped",
        len(registry.all()), time.monotonic() - started, len(registry.load_errors),
    )  # fmt: skip


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
