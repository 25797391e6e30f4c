"""Dependencies as `Annotated` aliases: the app's state, readiness, the admin check."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, status

from service.batch.service import JobService
from service.classifiers.service import ClassifierService
from service.online.backend import SamplingBackend
from service.runtime import Runtime
from service.settings import Settings


@dataclass
class AppState:
    """Everything a route may need; built by create_app."""

    settings: Settings
    runtime: Runtime
    jobs: JobService
    classifiers: ClassifierService

    @property
    def registry(self):
        return self.runtime.registry

    @property
    def metrics(self):
        return self.runtime.metrics


# Dependencies are `async def`: FastAPI runs plain `def` ones in a thread pool, a hop
# per request that costs more than the check itself.
async def get_state(request: Request) -> AppState:
    return request.app.state.imh


StateDep = Annotated[AppState, Depends(get_state)]


def _unavailable(reason: str) -> HTTPException:
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, reason, headers={"Retry-After": "1"})


async def get_sampling(state: StateDep) -> SamplingBackend:
    if reason := state.runtime.unavailable(need_worker=True):
        raise _unavailable(reason)
    return state.runtime.backend


async def get_jobs(state: StateDep) -> JobService:
    """Jobs need Redis, not a worker: an accepted job waits in the queue for one."""
    if reason := state.runtime.unavailable(need_worker=False):
        raise _unavailable(reason)
    return state.jobs


SamplingDep = Annotated[SamplingBackend, Depends(get_sampling)]
JobsDep = Annotated[JobService, Depends(get_jobs)]


def is_admin(settings: Settings, authorization: str | None) -> bool:
    """Whether `Authorization` carries the configured admin token (no token: never)."""
    token = settings.admin_token
    scheme, _, given = (authorization or "").partition(" ")
    if token is None or scheme.lower() != "bearer" or not given:
        return False
    return secrets.compare_digest(given.encode(), token.get_secret_value().encode())


async def require_admin(
    state: StateDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    """`Authorization: Bearer $IMH_ADMIN_TOKEN`; without a configured token, refuse all."""
    if state.settings.admin_token is None:
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
    if not is_admin(state.settings, authorization):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong admin token")


AdminDep = Annotated[None, Depends(require_admin)]
ADMIN_ERRORS: dict[int | str, dict[str, str]] = {  # the answers of require_admin
    401: {"description": "no bearer token"},
    403: {"description": "wrong token, or no IMH_ADMIN_TOKEN configured"},
}


async def require_json(request: Request) -> None:
    """JSON routes answer a clear 415 for other bodies (a form post, say)."""
    content_type = request.headers.get("content-type") or "application/json"
    media = content_type.split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"send the body as JSON (Content-Type: application/json), not {media}",
        )
