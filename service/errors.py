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
    """An upload names a version that exists and did not ask to replace it: 409."""


class BadModelFile(ServiceError):
    """A manifest or model file is malformed, inconsistent or fails its smoke test: 400."""


class UnsafeModelFile(BadModelFile):
    """A file would need unpickling (or could run code) to load: refused (415)."""


class QueueFull(ServiceError):
    """The scheduler's queue is full; retry after a short wait: 503."""


class NotReady(ServiceError):
    """Models are still loading: 503."""


class EngineFailure(ServiceError):
    """Model code raised while running this request's chains: 500 with the reason."""
