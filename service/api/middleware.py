"""ASGI middleware of the API: what every request passes before a route sees it.

- `HttpMetrics`: per-route request counts and latencies.
- `BodyLimits`: Starlette's request body limit, enforced while the body is read (a
  Content-Length over the limit is refused before a byte is read), with the limit
  chosen per request: IMH_MAX_UPLOAD_BYTES for uploads (multipart, `.npy` bytes),
  IMH_MAX_BODY_BYTES for everything else.
- `HostGuard`: Starlette's trusted-host check (IMH_ALLOWED_HOSTS), so a page on another
  site cannot reach a loopback server through DNS rebinding. Probes and /metrics are
  exempt: orchestrators call them by IP address.
- `OriginGuard`: state-changing requests (POST, PUT, PATCH, DELETE) sent by a browser
  from another origin are refused unless that origin is in IMH_ALLOWED_ORIGINS. A
  multipart form POST needs no CORS preflight, so CORS alone would not stop it.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

UPLOAD_TYPES = ("multipart/form-data", "application/x-npy", "application/octet-stream")
PROBE_PATHS = ("/healthz", "/readyz", "/metrics")
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


class HttpMetrics:
    """Counts answers and times them per route template (pure ASGI: streams pass through)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.http_requests.labels(route, str(status)).inc()
            self.metrics.http_duration.labels(route).observe(time.perf_counter() - started)


class BodyLimits:
    def __init__(self, app: ASGIApp, json_bytes: int, upload_bytes: int):
        self.json = RequestBodyLimitMiddleware(app, max_body_size=json_bytes)
        self.upload = RequestBodyLimitMiddleware(app, max_body_size=upload_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = (
            Headers(scope=scope).get("content-type", "") if scope["type"] == "http" else ""
        )
        limited = self.upload if content_type.startswith(UPLOAD_TYPES) else self.json
        await limited(scope, receive, send)


class HostGuard:
    def __init__(self, app: ASGIApp, allowed_hosts: list[str]):
        self.app = app
        self.checked = TrustedHostMiddleware(app, allowed_hosts=allowed_hosts or ["*"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
        else:
            await self.checked(scope, receive, send)


class OriginGuard:
    def __init__(self, app: ASGIApp, allowed_origins: list[str]):
        self.app, self.allowed = app, {origin.rstrip("/") for origin in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in UNSAFE_METHODS:
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and not self._trusted(origin.rstrip("/"), headers):
                answer = JSONResponse(
                    {"detail": f"cross-site request from {origin} refused; a server that "
                     "should accept it lists the origin in IMH_ALLOWED_ORIGINS"},
                    status_code=403,
                )  # fmt: skip
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _trusted(self, origin: str, headers: Headers) -> bool:
        if origin in self.allowed or "*" in self.allowed:
            return True
        if headers.get("sec-fetch-site") == "same-origin":
            return True
        return urlsplit(origin).netloc == headers.get("host", "")  # same host and port
