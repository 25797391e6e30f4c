"""Probes and Prometheus metrics: GET /healthz, /readyz, /metrics."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter, Response, status
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from service.api.deps import StateDep
from service.distributed.keys import STREAMS
from service.distributed.queue import depth
from service.metrics import CONTENT_TYPE

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Ready to take work: models loaded (distributed: Redis answers, a worker lives)",
    responses={503: {"description": "loading, loading failed, Redis down or no worker"}},
)
async def readyz(state: StateDep) -> JSONResponse:
    runtime = state.runtime
    health = runtime.health
    body = {
        "mode": "distributed" if runtime.distributed else "embedded",
        "models": len(state.registry.all()),
        "load_errors": len(state.registry.load_errors),
        "redis": "up" if health.redis_up else "down",
        "workers": health.workers,
    }
    reason = runtime.unavailable(need_worker=True)
    if reason is None and not any(m.kind == "generator" for m in state.registry.all()):
        reason = "no generator is loaded: upload one (POST /v1/models) or start with the zoo"
    if reason is not None:
        status_name = "loading" if not runtime.ready else "unavailable"
        return JSONResponse(
            {"status": status_name, "detail": reason, **body},
            status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "1"},
        )
    return JSONResponse({"status": "ready", **body})


@router.get("/metrics", summary="Prometheus text format", response_class=Response)
async def metrics(state: StateDep) -> Response:
    m = state.metrics
    kinds = Counter(model.kind for model in state.registry.all())
    for kind in ("generator", "discriminator", "proposal", "classifier", "features"):
        m.models_loaded.labels(kind).set(kinds.get(kind, 0))
    m.model_load_errors.set(len(state.registry.load_errors))
    await _queue_gauges(state)
    return Response(m.render(), media_type=CONTENT_TYPE)


async def _queue_gauges(state: StateDep) -> None:
    """Queue depth, jobs by state, workers and Redis health, read from Redis now."""
    m, runtime = state.metrics, state.runtime
    health = runtime.health
    m.workers.set(health.workers)
    m.redis_up.set(1 if health.redis_up else 0)
    if not (runtime.ready and health.redis_up):
        return
    try:
        for stream in STREAMS:
            m.queue_depth.labels(stream).set(await depth(runtime.broker, stream))
        await state.jobs.update_gauges()
    except (RedisError, OSError):
        m.redis_up.set(0)
