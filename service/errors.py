"""Errors the service layer raises; routes and app.py map them to HTTP statuses.

The service layer never imports FastAPI, so it says what went wrong with these types and
the HTTP layer decides the status code (see `service.app.STATUS_BY_ERROR`).
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: `message` is safe to show to the client."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(ServiceError):
    """The request is well-formed JSON but asks for something impossible (422).

    `field` is the location of the offending value, e.g. ("params", "beta"), so the
    response can name it the way pydantic's own validation errors do.
    """

    def __init__(self, message: str, field: tuple[str | int, ...] = ()):
        super().__init__(message)
        self.field = field


class ModelNotFound(ServiceError):
    """No loaded model has this name (or version): 404."""


class ModelConflict(ServiceError):
    """The request conflicts with what exists: an upload names a version that exists and
    did not ask to replace it, or a job's result is asked for before it has one: 409."""


class BadModelFile(ServiceError):
    """A manifest or model file is malformed, inconsistent or fails its smoke test: 400."""


class UnsafeModelFile(BadModelFile):
    """A file would need unpickling (or could run code) to load: refused (415)."""


class QueueFull(ServiceError):
    """The scheduler's queue is full; retry after a short wait: 503."""


class NotReady(ServiceError):
    """Models are still loading: 503."""


class Unavailable(ServiceError):
    """Redis is unreachable or no worker is alive (distributed mode): 503."""


class EngineFailure(ServiceError):
    """Model code raised while running this request's chains: 500 with the reason."""


def check_limit(value: int, limit: int, field: tuple, what: str | None = None) -> None:
    """InvalidRequest naming `field` when value exceeds a configured limit."""
    if value > limit:
        raise InvalidRequest(f"{what or field[-1]} must be <= {limit} (got {value})", field)


# Most specific first: UnsafeModelFile is a BadModelFile.
STATUS_BY_ERROR: list[tuple[type[ServiceError], int]] = [
    (InvalidRequest, 422),
    (ModelNotFound, 404),
    (ModelConflict, 409),
    (UnsafeModelFile, 415),
    (BadModelFile, 400),
    (QueueFull, 503),
    (NotReady, 503),
    (Unavailable, 503),
    (EngineFailure, 500),
]


def status_of(error: ServiceError) -> int:
    return next(code for kind, code in STATUS_BY_ERROR if isinstance(error, kind))


def error_from(status: int, message: str, field: tuple = ()) -> ServiceError:
    """The error a worker reported (by status), raised again on the API side."""
    if status == 422:
        return InvalidRequest(message, field)
    kind = next((kind for kind, code in STATUS_BY_ERROR if code == status), EngineFailure)
    return kind(message)
