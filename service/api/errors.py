"""HTTP answers for errors: the status of each service error type, and the handlers that
turn errors into JSON bodies.

Validation errors never echo more than a short excerpt of the input (a large invalid
body must not come back as a large answer), and text that cannot be encoded (a lone
surrogate) is escaped rather than crashing the answer.
"""

from __future__ import annotations

import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import (
    BadModelFile,
    EngineFailure,
    Forbidden,
    InvalidRequest,
    ModelConflict,
    ModelNotFound,
    QueueFull,
    ServiceError,
    TooLarge,
    Unavailable,
    UnsafeModelFile,
)

# Most specific first: UnsafeModelFile is a BadModelFile.
STATUS_BY_ERROR: list[tuple[type[ServiceError], int]] = [
    (InvalidRequest, 422),
    (ModelNotFound, 404),
    (ModelConflict, 409),
    (Forbidden, 403),
    (TooLarge, 413),
    (UnsafeModelFile, 415),
    (BadModelFile, 400),
    (QueueFull, 503),
    (Unavailable, 503),
    (EngineFailure, 500),
]
EXCERPT_CHARS = 120  # of an offending input value shown back in a 422


def status_of(error: ServiceError) -> int:
    return next((code for kind, code in STATUS_BY_ERROR if isinstance(error, kind)), 500)


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(405, _method_not_allowed)


async def _method_not_allowed(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """405 with an Allow header that lists every method of the path, as the OpenAPI
    document has them (Starlette names only the first matching route's)."""
    allow = ", ".join(_allowed_methods(request.app, request.url.path))
    return JSONResponse(
        {"detail": f"{request.method} is not allowed here; use {allow}"}, 405,
        headers={"Allow": allow},
    )  # fmt: skip


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    methods: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\{[^/}]+\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": [_problem(problem) for problem in error.errors()]}, 422)


async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
    code = status_of(error)
    if isinstance(error, InvalidRequest):
        loc = [error.location, *error.field]
        detail = [{"loc": loc, "msg": error.message, "type": "value_error"}]
        return JSONResponse({"detail": _printable(detail)}, code)
    headers = {"Retry-After": "1"} if code == 503 else None
    return JSONResponse({"detail": _printable(error.message)}, code, headers=headers)


def _problem(problem: dict[str, Any]) -> dict[str, Any]:
    """One pydantic problem as JSON: location, message, type and a short input excerpt."""
    shown = {key: problem[key] for key in ("loc", "msg", "type") if key in problem}
    if "input" in problem:
        shown["input"] = excerpt(problem["input"])
    if isinstance(problem.get("ctx"), dict):
        shown["ctx"] = {key: excerpt(value) for key, value in problem["ctx"].items()}
    return _printable(shown)


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> Any:
    """Numbers and short strings as they are; anything larger as a truncated repr."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no NaN
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _printable(value: Any) -> Any:
    """Strings with lone surrogates escaped, so the answer always encodes as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_printable(key): _printable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(item) for item in value]
    return value
