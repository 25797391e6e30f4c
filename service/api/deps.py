"""Dependencies as `Annotated` aliases: the app's state, readiness, the admin check."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Header, HTTPException, Request, status

from service.batch.service import JobService
from service.metrics import Metrics
from service.models.registry import Registry
from service.online.engine import Engine
from service.online.service import SamplingService
from service.settings import Settings

if TYPE_CHECKING:
    from service.distributed.connection import Broker, Health


@dataclass
class AppState:
    """Everything a route may need; built by create_app, filled in at start."""

    settings: Settings
    metrics: Metrics
    registry: Registry
    engine: Engine
    sampling: Any  # SamplingService (embedded) or RemoteSampling (distributed)
    ready: bool = False
    startup_error: str | None = None
    tasks: set = field(default_factory=set)
    distributed: bool = False
    broker: Broker | None = None
    health: Health | None = None
    jobs: JobService | None = None

    def unavailable(self, need_worker: bool) -> str | None:
        """Why work cannot be taken now (None: it can)."""
        if not self.ready:
            return self.startup_error or "models are still loading; retry shortly"
        if not self.health.redis_up:
            return self.health.error or "Redis is unreachable"
        if need_worker and self.health.workers == 0:
            return "no worker is available; start `imh worker` processes"
        return None


# Dependencies are `async def`: FastAPI runs plain `def` ones in a thread pool, a hop
# per request that costs more than the check itself.
async def get_state(request: Request) -> AppState:
    return request.app.state.imh


StateDep = Annotated[AppState, Depends(get_state)]


def _unavailable(reason: str) -> HTTPException:
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, reason, headers={"Retry-After": "1"})


async def get_sampling(state: StateDep) -> SamplingService:
    if reason := state.unavailable(need_worker=True):
        raise _unavailable(reason)
    return state.sampling


async def get_jobs(state: StateDep) -> JobService:
    """Jobs need Redis, not a worker: an accepted job waits in the queue for one."""
    if reason := state.unavailable(need_worker=False):
        raise _unavailable(reason)
    return state.jobs


SamplingDep = Annotated[SamplingService, Depends(get_sampling)]
JobsDep = Annotated[JobService, Depends(get_jobs)]


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
