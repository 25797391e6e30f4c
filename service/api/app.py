"""The FastAPI application: `create_app(settings)` mounts one router per resource.

Embedded mode (no IMH_REDIS_URL): the registry, the engine and its scheduler threads
live in this process, and an in-process worker runs batch jobs over an in-process store.
Distributed mode (IMH_REDIS_URL): this process is a stateless front end. It keeps the
registry to check requests and answer model questions, and sends the work to `imh
worker` processes over Redis. Either way `service.runtime.Runtime` holds what runs;
models load in the background after start, /healthz answers at once and /readyz turns
200 when loading is done (and, distributed, when Redis answers and a worker is alive).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.api.deps import AppState
from service.api.errors import install_handlers
from service.api.middleware import BodyLimits, HostGuard, HttpMetrics, OriginGuard
from service.api.openapi import install_openapi
from service.api.routes import classifiers, dashboard, health, jobs, methods, models, sample
from service.batch.service import JobService
from service.classifiers.service import ClassifierService
from service.runtime import Runtime
from service.settings import Settings, get_settings

SHUTDOWN_DRAIN_S = 2.0  # embedded job shards get this long to finish at shutdown


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    runtime = Runtime(settings, role="api")
    jobs_service = JobService(
        runtime.store, runtime.registry, runtime.sampling, settings, runtime.metrics
    )
    state = AppState(
        settings, runtime, jobs_service,
        ClassifierService(runtime.registry, settings, runtime.metrics),
    )  # fmt: skip

    app = FastAPI(
        title="imh-service",
        summary="Implicit Metropolis-Hastings post-processing for GANs",
        version="0.1.0",
        lifespan=runtime.lifespan(SHUTDOWN_DRAIN_S),
        docs_url=None,  # served by the dashboard router from local assets, like /redoc
        redoc_url=None,
    )
    app.state.imh = state
    # Added innermost first: a request meets HttpMetrics, HostGuard, CORS, OriginGuard,
    # BodyLimits, then the routes.
    app.add_middleware(BodyLimits, json_bytes=settings.max_body_bytes,
                       upload_bytes=settings.max_upload_bytes)  # fmt: skip
    app.add_middleware(OriginGuard, allowed_origins=settings.origins)
    if settings.origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.origins, allow_methods=["*"],
            allow_headers=["*"], expose_headers=["X-IMH-Request-Id", "X-IMH-Stats", "Location"],
        )  # fmt: skip
    app.add_middleware(HostGuard, allowed_hosts=settings.host_names)
    app.add_middleware(HttpMetrics, metrics=runtime.metrics)
    routers = (health, models, methods, sample, jobs, classifiers, dashboard)
    for router in (module.router for module in routers):
        app.include_router(router)
    install_handlers(app)
    install_openapi(app)
    return app
