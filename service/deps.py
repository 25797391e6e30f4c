"""Dependencies as `Annotated` aliases: the app's state, readiness, the admin check."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, status

from service.engine import Engine
from service.metrics import Metrics
from service.registry import Registry
from service.sampling import SamplingService
from service.settings import Settings


@dataclass
class AppState:
    """Everything a route may need; built by create_app, filled in at start."""

    settings: Settings
    metrics: Metrics
    registry: Registry
    engine: Engine
    sampling: SamplingService
    ready: bool = False
    startup_error: str | None = None
    tasks: set = field(default_factory=set)


# Dependencies are `async def`: FastAPI runs plain `def` ones in a thread pool, a hop
# per request that costs more than the check itself.
async def get_state(request: Request) -> AppState:
    return request.app.state.imh


StateDep = Annotated[AppState, Depends(get_state)]


async def get_sampling(state: StateDep) -> SamplingService:
    if not state.ready:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "models are still loading; retry shortly",
            headers={"Retry-After": "1"},
        )
    return state.sampling


SamplingDep = Annotated[SamplingService, Depends(get_sampling)]


async def require_admin(
    state: StateDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    """`Authorization: Bearer $IMH_ADMIN_TOKEN`; without a configured token, refuse all."""
    token = state.settings.admin_token
    if token is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "model administration is disabled: the server has no IMH_ADMIN_TOKEN",
        )
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "send Authorization: Bearer <admin token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong admin token")


AdminDep = Annotated[None, Depends(require_admin)]
