"""Probes and Prometheus metrics: GET /healthz, /readyz, /metrics."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter, Response, status
from fastapi.responses import JSONResponse

from service.deps import StateDep
from service.metrics import CONTENT_TYPE

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Models are loaded and the engine takes requests (503 until then)",
    responses={503: {"description": "still loading, or loading failed"}},
)
async def readyz(state: StateDep) -> JSONResponse:
    if not state.ready:
        detail = state.startup_error or "loading models"
        return JSONResponse(
            {"status": "loading", "detail": detail},
            status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "1"},
        )
    return JSONResponse(
        {
            "status": "ready",
            "models": len(state.registry.all()),
            "load_errors": len(state.registry.load_errors),
        }
    )


@router.get("/metrics", summary="Prometheus text format", response_class=Response)
async def metrics(state: StateDep) -> Response:
    kinds = Counter(model.kind for model in state.registry.all())
    for kind in ("generator", "discriminator", "proposal", "classifier", "features"):
        state.metrics.models_loaded.labels(kind).set(kinds.get(kind, 0))
    state.metrics.model_load_errors.set(len(state.registry.load_errors))
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
