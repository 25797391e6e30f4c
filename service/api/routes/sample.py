"""POST /v1/sample (one answer) and POST /v1/sample/stream (SSE or NDJSON)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from service.api import encoding
from service.api.deps import SamplingDep, require_json
from service.online.backend import Event
from service.online.schemas import PngOptions, SampleCreate, SamplePublic

router = APIRouter(prefix="/v1", tags=["sample"])
JSON_BODY = [Depends(require_json)]
NDJSON = "application/x-ndjson"
INLINE_ENCODE_VALUES = 20_000  # about a millisecond of JSON encoding
DISCONNECT_POLL_S = 0.25  # how soon a gone client's chains are freed
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "the body cannot be read as text"},
    404: {"description": "unknown generator or discriminator"},
    413: {"description": "the body is larger than IMH_MAX_BODY_BYTES"},
    415: {"description": "the body is not JSON"},
    422: {"description": "malformed JSON, or a field out of range, of the wrong type, unknown"},
    503: {"description": "the scheduler queue is full or models are loading (Retry-After)"},
}


@router.post(
    "/sample",
    dependencies=JSON_BODY,
    response_model=SamplePublic,
    summary="Draw n samples with a post-processing method",
    responses={
        **ERRORS,
        200: {
            "content": {"application/x-npy": {}, "image/png": {}},
            "description": "JSON by default; format npy gives np.save bytes (stats in the "
            "X-IMH-Stats header), png an image grid for image models",
        },
    },
)
async def sample(body: SampleCreate, service: SamplingDep, request: Request) -> Response:
    resolved, samples, stats = await _unless_disconnected(request, service.sample(body))
    if body.format == "json":
        content = await _encode(samples.numel(), encoding.samples_json, samples, stats)
        return Response(content, media_type="application/json")
    headers = {"X-IMH-Stats": json.dumps(stats)}
    if body.format == "npy":
        content = await _encode(samples.numel(), encoding.npy_bytes, samples)
        return Response(content, media_type="application/x-npy", headers=headers)
    value_range = resolved.generator.manifest.value_range
    png = body.png or PngOptions()
    content = await run_in_threadpool(
        encoding.png_bytes, samples, value_range, png.scale, png.columns
    )
    return Response(content, media_type="image/png", headers=headers)


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it (and so freeing its chains) if the client goes away."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise HTTPException(499, "the client closed the connection")  # never sent
    finally:
        task.cancel()  # no-op once done; a cancelled handler cancels the work too


async def _encode(values: int, encode, *args) -> bytes:
    """Small answers encode inline; large ones in a thread, off the event loop."""
    if values <= INLINE_ENCODE_VALUES:
        return encode(*args)
    return await run_in_threadpool(encode, *args)


class EventStreamResponse(StreamingResponse):
    """Closes its event source however the response ends, so a client that leaves
    frees its chains at once."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


@router.post(
    "/sample/stream",
    dependencies=JSON_BODY,
    summary="Stream newly accepted samples, live metrics and final stats",
    response_class=EventStreamResponse,
    responses={
        **ERRORS,
        200: {
            "content": {"text/event-stream": {}, NDJSON: {}},
            "description": "server-sent events `samples`, `metrics`, `done` (and `error`); "
            "one JSON object per line with an `event` field for Accept: application/x-ndjson",
        },
    },
)
async def sample_stream(
    body: SampleCreate, service: SamplingDep, accept: Annotated[str | None, Header()] = None
) -> EventStreamResponse:
    stream = await service.events(body)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if stream.request_id is not None:  # events carry Redis stream ids: resumable
        headers["X-IMH-Request-Id"] = stream.request_id
    return _stream_response(stream.events, accept, headers)


@router.get(
    "/sample/stream/{request_id}",
    summary="Resume a stream after Last-Event-ID (distributed mode)",
    response_class=EventStreamResponse,
    responses={
        404: {"description": "unknown or expired stream, or embedded mode"},
        200: {"content": {"text/event-stream": {}}},
    },
)
async def resume_stream(
    request_id: Annotated[str, Path(pattern=r"^[0-9a-f]{1,64}$")],
    service: SamplingDep,
    last_event_id: Annotated[
        str, Header(pattern=r"^(\d+-\d+)?$", description="resume after this event id")
    ] = "",
    accept: Annotated[str | None, Header()] = None,
) -> EventStreamResponse:
    events = await service.resume(request_id, last_event_id or "0")
    headers = {"Cache-Control": "no-cache", "X-IMH-Request-Id": request_id}
    return _stream_response(events, accept, headers)


def _stream_response(events, accept: str | None, headers: dict) -> EventStreamResponse:
    ndjson = NDJSON in (accept or "")
    return EventStreamResponse(
        _ndjson(events) if ndjson else _sse(events),
        media_type=NDJSON if ndjson else "text/event-stream",
        headers=headers,
    )


async def _sse(events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    try:
        async for name, data, event_id in events:
            yield encoding.sse_frame(event_id, name, _public(name, data))
    finally:
        await events.aclose()


async def _ndjson(events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    try:
        async for name, data, _ in events:
            yield encoding.json_bytes({"event": name, **_public(name, data)}) + b"\n"
    finally:
        await events.aclose()


def _public(name: str, data: Any) -> dict[str, Any]:
    """An event's JSON: sample arrays become nested lists (float32 printed exactly)."""
    if name == "samples":
        return {"samples": encoding.as_lists(data)}
    return data
