"""Errors the service layer raises. It never imports FastAPI: it says what went wrong with
these types, and the HTTP layer (service/api/errors.py) picks the status code.

Each type has a short `code` that travels between processes: a worker that fails a
request writes the code and message to the request's event stream, and the API front
end raises the same type again (`error_from`), so a client sees the same answer in
embedded and distributed mode.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base class: `message` is safe to show to the client."""

    code = "error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def wire(self) -> dict[str, Any]:
        """The error as JSON for another process; `error_from` reads it back."""
        return {"code": self.code, "detail": self.message}


class InvalidRequest(ServiceError):
    """The request is well-formed but asks for something impossible.

    `field` is the location of the offending value, e.g. ("params", "beta"), so the
    answer can name it the way pydantic's own validation errors do.
    """

    code = "invalid_request"

    def __init__(self, message: str, field: tuple[str | int, ...] = (), location: str = "body"):
        super().__init__(message)
        self.field, self.location = field, location  # location: body, query or header

    def wire(self) -> dict[str, Any]:
        return {**super().wire(), "field": list(self.field)}


class ModelNotFound(ServiceError):
    """No loaded model (or job, or stream) has this name or id."""

    code = "not_found"


class ModelConflict(ServiceError):
    """The request conflicts with what exists: an upload names a version that exists and
    did not ask to replace it, or a job's result is asked for before it has one."""

    code = "conflict"


class Forbidden(ServiceError):
    """The caller may not do this (a job's owner token is missing or wrong)."""

    code = "forbidden"


class TooLarge(ServiceError):
    """An upload or body is larger than the configured limit."""

    code = "too_large"


class BadModelFile(ServiceError):
    """A manifest or model file is malformed, inconsistent or fails its smoke test."""

    code = "bad_model_file"


class UnsafeModelFile(BadModelFile):
    """A file would need unpickling, or could run code or touch files, to load: refused."""

    code = "unsafe_model_file"


class QueueFull(ServiceError):
    """The scheduler's queue is full; retry after a short wait."""

    code = "queue_full"


class Unavailable(ServiceError):
    """Models are loading, Redis is unreachable or no worker is alive."""

    code = "unavailable"


class EngineFailure(ServiceError):
    """Model code raised while running this request's chains."""

    code = "engine_failure"


def check_limit(value: int, limit: int, field: tuple, what: str | None = None) -> None:
    """InvalidRequest naming `field` when value exceeds a configured limit."""
    if value > limit:
        raise InvalidRequest(f"{what or field[-1]} must be <= {limit} (got {value})", field)


_BY_CODE = {
    kind.code: kind
    for kind in (
        InvalidRequest, ModelNotFound, ModelConflict, Forbidden, TooLarge, BadModelFile,
        UnsafeModelFile, QueueFull, Unavailable, EngineFailure,
    )
}  # fmt: skip


def error_from(data: dict[str, Any]) -> ServiceError:
    """The error another process reported with `ServiceError.wire()`, raised again here."""
    kind = _BY_CODE.get(data.get("code", ""), EngineFailure)
    if kind is InvalidRequest:
        return InvalidRequest(data["detail"], tuple(data.get("field", ())))
    return kind(data["detail"])
