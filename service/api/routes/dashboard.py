"""The service's own pages: GET / (the dashboard), GET /dashboard/{file} (its static
files), GET /v1/summary (a compact JSON of the service's metrics, what the dashboard's
Service view shows), and the API reference at /docs (Swagger UI) and /redoc (ReDoc).

Everything a page loads comes from this server: the dashboard's files ship inside the
package (service/api/dashboard/, with a vendored uPlot), and the Swagger UI and ReDoc
bundles come from the `fastapi-offline` package, so the pages work without a network.

/v1/summary reads this process's Prometheus registry and, where the work runs elsewhere
(distributed mode), the workers' heartbeats in Redis. Counters come as totals with the
server's clock (`at`), so a client derives rates between two reads; the answer also
carries a rate over the last few seconds of reads (`proposals_per_second`).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import mimetypes
import time
from collections import deque
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from weakref import WeakKeyDictionary

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field
from redis.exceptions import RedisError

from service.api.deps import StateDep
from service.distributed.keys import STREAMS
from service.distributed.queue import depth

router = APIRouter()

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard"
DOCS_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
RATE_WINDOW_S = 10.0  # proposals_per_second: over the reads of about this long
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TEXT_TYPES = ("text/", "application/javascript", "application/json", "image/svg+xml")


# Static files ------------------------------------------------------------------------


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes | None
    media_type: str
    etag: str


def _asset(path: Path) -> Asset:
    body = path.read_bytes()
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if path.suffix == ".js":
        media_type = "text/javascript"
    if media_type.startswith("text/"):
        media_type += "; charset=utf-8"
    compressible = media_type.startswith(TEXT_TYPES) and len(body) > 1024
    gzipped = gzip.compress(body, compresslevel=9, mtime=0) if compressible else None
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return Asset(body, gzipped, media_type, etag)


class Assets:
    """Files of one folder, read once on first use and kept in memory (they are small
    and never change while the server runs); nothing outside the folder is served."""

    def __init__(self, folder: Path, names: tuple[str, ...] | None = None):
        self.folder, self.names = folder, names
        self._files: dict[str, Asset] | None = None

    def files(self) -> dict[str, Asset]:
        if self._files is None:
            found = {}
            if self.folder.is_dir():
                for path in sorted(self.folder.rglob("*")):
                    name = path.relative_to(self.folder).as_posix()
                    if path.is_file() and (self.names is None or name in self.names):
                        found[name] = _asset(path)
            self._files = found
        return self._files

    def response(self, name: str, request: Request, cache: str = "no-cache") -> Response:
        asset = self.files().get(name)
        if asset is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no file {name!r} here")
        headers = {"ETag": asset.etag, "Cache-Control": cache, "Vary": "Accept-Encoding"}
        if asset.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
        body = asset.body
        if asset.gzipped is not None and "gzip" in request.headers.get("accept-encoding", ""):
            body, headers["Content-Encoding"] = asset.gzipped, "gzip"
        return Response(body, media_type=asset.media_type, headers=headers)


DASHBOARD = Assets(DASHBOARD_DIR)


def _docs_assets() -> Assets | None:
    try:
        folder = resources.files("fastapi_offline") / "static"
    except ModuleNotFoundError:
        return None
    return Assets(Path(str(folder)), DOCS_ASSETS)


DOCS = _docs_assets()
# The page's own headers: no framing by other sites, no inline code beyond its own.
PAGE_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# The API reference pages: their own inline start-up script, and nothing from elsewhere
# (ReDoc's sidebar shows a logo from the vendor's CDN: refused here, it hides itself).
DOCS_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; connect-src 'self'; "
    "font-src 'self' data:; frame-ancestors 'none'; base-uri 'none'"
)
DASHBOARD_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def dashboard(request: Request) -> Response:
    answer = DASHBOARD.response("index.html", request)
    answer.headers.update({**PAGE_HEADERS, "Content-Security-Policy": DASHBOARD_CSP})
    return answer


@router.api_route("/dashboard/{name:path}", methods=["GET", "HEAD"], include_in_schema=False)
async def dashboard_file(name: str, request: Request) -> Response:
    answer = DASHBOARD.response(name, request)
    answer.headers["X-Content-Type-Options"] = "nosniff"
    return answer


def _docs_root(request: Request) -> str:
    if DOCS is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "the API reference pages need the fastapi-offline package (pip install "
            "fastapi-offline); the document itself is at /openapi.json",
        )
    return request.scope.get("root_path", "").rstrip("/")


@router.api_route("/docs", methods=["GET", "HEAD"], include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _docs_root(request)
    return _docs_page(
        get_swagger_ui_html(
            openapi_url=f"{root}{request.app.openapi_url}",
            title=f"{request.app.title} - Swagger UI",
            swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs/assets/favicon.png",
            oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
            # No badge that would send the document to an online validator.
            swagger_ui_parameters={"validatorUrl": None},
        )
    )


@router.get("/docs/oauth2-redirect", include_in_schema=False)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.api_route("/docs/assets/{name}", methods=["GET", "HEAD"], include_in_schema=False)
async def docs_asset(name: str, request: Request) -> Response:
    _docs_root(request)
    assert DOCS is not None
    return DOCS.response(name, request, cache="public, max-age=86400")


@router.api_route("/redoc", methods=["GET", "HEAD"], include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    root = _docs_root(request)
    return _docs_page(
        get_redoc_html(
            openapi_url=f"{root}{request.app.openapi_url}",
            title=f"{request.app.title} - ReDoc",
            redoc_js_url=f"{root}/docs/assets/redoc.standalone.js",
            redoc_favicon_url=f"{root}/docs/assets/favicon.png",
            with_google_fonts=False,
        )
    )


def _docs_page(page: HTMLResponse) -> HTMLResponse:
    page.headers.update({**PAGE_HEADERS, "Content-Security-Policy": DOCS_CSP})
    return page


# GET /v1/summary ---------------------------------------------------------------------


class Bucket(BaseModel):
    le: float | None = Field(description="upper bound of the bucket (null: above the last)")
    count: int = Field(description="steps in this bucket (not cumulative)")


class BatchRows(BaseModel):
    count: int = Field(description="batched kernel steps observed")
    mean: float | None = Field(description="rows (chains) per step, on average")
    p50: float | None = Field(description="median rows per step (its bucket's upper bound)")
    p95: float | None = Field(description="95th percentile (its bucket's upper bound)")
    buckets: list[Bucket] = Field(description="the non-empty buckets, smallest first")


class ModelActivity(BaseModel):
    model: str
    method: str
    proposals: float
    accepted: float
    active_chains: float
    queued_rows: float


class Sampling(BaseModel):
    source: Literal["this process", "workers", "none"] = Field(
        description="where the sampling counters come from: this process's engine "
        "(embedded), the workers' heartbeats (distributed), or none (distributed, and the "
        "workers report no counters: read each worker's /metrics)"
    )
    proposals_total: float
    accepted_total: float
    acceptance_rate: float | None
    proposals_per_second: float | None = Field(
        description="since the oldest summary read in the last 10 s, by any client (null: "
        "no such read; a client can also derive rates from two reads' totals and `at`)"
    )
    active_chains: float
    queued_rows: float
    requests: dict[str, float] = Field(description="sampling requests by outcome")
    batch_rows: BatchRows
    by_model: list[ModelActivity]


class WorkerPublic(BaseModel):
    name: str
    host: str | None
    device: str | None
    running: dict[str, int] = Field(description="work messages running, by stream")
    seen_s_ago: float | None


class Http(BaseModel):
    requests: float
    client_errors: float = Field(description="4xx answers")
    server_errors: float = Field(description="5xx answers")


class SummaryPublic(BaseModel):
    at: float = Field(description="the server's Unix time of this summary")
    mode: Literal["embedded", "distributed"]
    ready: bool
    detail: str | None = Field(description="why work cannot be taken now (null: it can)")
    redis_up: bool
    workers: int
    worker_list: list[WorkerPublic]
    models: dict[str, int] = Field(description="loaded models by kind")
    load_errors: int
    queue_depth: dict[str, int] = Field(description="work messages not yet acknowledged")
    jobs: dict[str, int] = Field(description="jobs kept in the store, by state")
    jobs_submitted: float
    sampling: Sampling
    http: Http


@dataclass
class _Window:
    reads: deque  # (monotonic time, proposals total)


_WINDOWS: WeakKeyDictionary[Any, _Window] = WeakKeyDictionary()


def _samples(metric: Any) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in metric.collect()
        for sample in family.samples
    ]


def _total(metric: Any, suffix: str = "_total") -> float:
    return sum(v for name, _, v in _samples(metric) if name.endswith(suffix))


def _by_labels(metric: Any, suffix: str, keys: tuple[str, ...]) -> dict[tuple, float]:
    out: dict[tuple, float] = {}
    for name, labels, value in _samples(metric):
        if name.endswith(suffix):
            key = tuple(labels.get(k, "") for k in keys)
            out[key] = out.get(key, 0.0) + value
    return out


def _quantile(cumulative: list[tuple[float, float]], count: float, q: float) -> float | None:
    """The upper bound of the bucket holding quantile q (None: none, or above the last
    finite bound)."""
    for bound, running in cumulative:
        if count > 0 and running >= q * count:
            return bound if bound != float("inf") else None
    return None


def _batch_rows(metric: Any) -> BatchRows:
    cumulative: dict[float, float] = {}
    count = total = 0.0
    for name, labels, value in _samples(metric):
        if name.endswith("_bucket"):
            bound = float(labels["le"])
            cumulative[bound] = cumulative.get(bound, 0.0) + value
        elif name.endswith("_count"):
            count += value
        elif name.endswith("_sum"):
            total += value
    ordered = sorted(cumulative.items())
    buckets, previous = [], 0.0
    for bound, running in ordered:
        if running > previous:
            le = None if bound == float("inf") else bound
            buckets.append(Bucket(le=le, count=int(running - previous)))
        previous = running
    return BatchRows(
        count=int(count),
        mean=total / count if count else None,
        p50=_quantile(ordered, count, 0.5),
        p95=_quantile(ordered, count, 0.95),
        buckets=buckets,
    )


async def _heartbeats(state: StateDep) -> list[dict[str, Any]]:
    broker = state.runtime.broker
    names = sorted(n.decode() for n in await broker.redis.smembers(broker.keys.workers))
    if not names:
        return []
    raw = await broker.redis.mget([broker.keys.worker(name) for name in names])
    beats = []
    for value in raw:
        if value is None:
            continue
        try:
            beats.append(json.loads(value))
        except ValueError:
            continue
    return beats


def _engine_from_heartbeats(beats: list[dict[str, Any]]) -> dict[str, float] | None:
    """Sums of the engine counters that workers put in their heartbeats (`engine`:
    proposals, accepted, active_chains, queued_rows), or None where none does."""
    engines = [b["engine"] for b in beats if isinstance(b.get("engine"), dict)]
    if not engines:
        return None
    keys = ("proposals", "accepted", "active_chains", "queued_rows")
    return {k: float(sum(float(e.get(k) or 0) for e in engines)) for k in keys}


def _rate(metrics: Any, proposals: float) -> float | None:
    """Proposals per second since the oldest read of the last RATE_WINDOW_S seconds
    (any client's), or None when there is no such read."""
    reads = _WINDOWS.setdefault(metrics, _Window(deque())).reads
    now = time.monotonic()
    while reads and now - reads[0][0] > RATE_WINDOW_S:
        reads.popleft()
    reads.append((now, proposals))
    while len(reads) > 64:
        reads.popleft()
    first_t, first_p = reads[0]
    if now - first_t < 0.2:
        return None
    return max(0.0, (proposals - first_p) / (now - first_t))


@router.get(
    "/v1/summary",
    response_model=SummaryPublic,
    tags=["health"],
    summary="A compact JSON of the service's own metrics (what the dashboard shows)",
)
async def summary(state: StateDep) -> SummaryPublic:
    runtime, m = state.runtime, state.metrics
    health = runtime.health
    kinds: dict[str, int] = {}
    for model in state.registry.all():
        kinds[model.kind] = kinds.get(model.kind, 0) + 1

    queue: dict[str, int] = {}
    jobs = dict.fromkeys(JOB_STATES, 0)
    beats: list[dict[str, Any]] = []
    redis_up = health.redis_up
    if runtime.ready and redis_up:
        try:
            depths = await asyncio.gather(*(depth(runtime.broker, s) for s in STREAMS))
            queue = dict(zip(STREAMS, (int(d) for d in depths), strict=True))
            for (_, job_state), count in (await state.jobs.store.state_counts()).items():
                jobs[job_state] = jobs.get(job_state, 0) + int(count)
            beats = await _heartbeats(state)
        except (RedisError, OSError):
            redis_up = False

    proposals = _by_labels(m.proposals, "_total", ("model", "method"))
    accepted = _by_labels(m.accepted, "_total", ("model", "method"))
    chains = _by_labels(m.active_chains, "", ("model", "method"))
    queued = _by_labels(m.queued_rows, "", ("model", "method"))
    keys = sorted(set(proposals) | set(chains) | set(queued))
    by_model = [
        ModelActivity(
            model=model,
            method=method,
            proposals=proposals.get((model, method), 0.0),
            accepted=accepted.get((model, method), 0.0),
            active_chains=chains.get((model, method), 0.0),
            queued_rows=queued.get((model, method), 0.0),
        )  # fmt: skip
        for model, method in keys
    ]
    totals = {
        "proposals": sum(proposals.values()),
        "accepted": sum(accepted.values()),
        "active_chains": sum(chains.values()),
        "queued_rows": sum(queued.values()),
    }
    source: Literal["this process", "workers", "none"] = "this process"
    if runtime.distributed:
        from_workers = _engine_from_heartbeats(beats)
        source = "workers" if from_workers is not None else "none"
        totals = from_workers or totals
    outcomes: dict[str, float] = {}
    for (outcome,), value in _by_labels(m.sample_requests, "_total", ("outcome",)).items():
        outcomes[outcome] = value

    statuses = _by_labels(m.http_requests, "_total", ("status",))
    now = time.time()
    return SummaryPublic(
        at=now,
        mode="distributed" if runtime.distributed else "embedded",
        ready=runtime.ready,
        detail=runtime.unavailable(need_worker=True),
        redis_up=redis_up,
        workers=health.workers,
        worker_list=[
            WorkerPublic(
                name=str(beat.get("name", "?")),
                host=beat.get("host"),
                device=beat.get("device"),
                running={k: int(v) for k, v in (beat.get("running") or {}).items()},
                seen_s_ago=round(now - beat["at"], 3)
                if isinstance(beat.get("at"), int | float)
                else None,
            )  # fmt: skip
            for beat in beats
        ],
        models=kinds,
        load_errors=len(state.registry.load_errors),
        queue_depth=queue,
        jobs=jobs,
        jobs_submitted=_total(m.jobs_submitted),
        sampling=Sampling(
            source=source,
            proposals_total=totals["proposals"],
            accepted_total=totals["accepted"],
            acceptance_rate=totals["accepted"] / totals["proposals"]
            if totals["proposals"]
            else None,
            proposals_per_second=_rate(m, totals["proposals"]),
            active_chains=totals["active_chains"],
            queued_rows=totals["queued_rows"],
            requests=outcomes,
            batch_rows=_batch_rows(m.batch_rows),
            by_model=by_model,
        ),
        http=Http(
            requests=sum(statuses.values()),
            client_errors=sum(v for (code,), v in statuses.items() if code.startswith("4")),
            server_errors=sum(v for (code,), v in statuses.items() if code.startswith("5")),
        ),
    )
