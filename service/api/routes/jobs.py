"""Batch jobs: POST /v1/jobs, GET /v1/jobs[/{id}[/events|/result]], DELETE /v1/jobs/{id}.

A generate job is a JSON body. A filter job uploads its candidates: multipart/form-data
with a `job` part (the JSON) and a `candidates` file (.npy or .safetensors).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import UploadFile

from service.api import encoding
from service.api.deps import JobsDep, StateDep
from service.batch.schemas import (
    FilterJobCreate,
    GenerateJobCreate,
    JobCreate,
    JobPublic,
    JobsPublic,
)
from service.errors import InvalidRequest

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{1,64}$", description="the id POST returned")]
SAFETENSORS = "application/x-safetensors"
_JOB = TypeAdapter(JobCreate)
_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["job", "candidates"],
    "properties": {
        "job": {"type": "string", "description": "the filter job as JSON (FilterJobCreate)"},
        "candidates": {"type": "string", "format": "binary", "description": ".npy or .safetensors"},
    },
}
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": GenerateJobCreate.model_json_schema()},
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
        },
    }
}


@router.post(
    "",
    status_code=201,
    response_model=JobPublic,
    summary="Submit a generate job (JSON) or a filter job (multipart upload)",
    openapi_extra=_BODY,
    responses={
        409: {"description": "conflict"},
        413: {"description": "the upload is larger than IMH_MAX_UPLOAD_BYTES"},
        422: {"description": "a field or the candidate file is invalid"},
        503: {"description": "Redis is unreachable or models are loading"},
    },
)
async def create_job(request: Request, jobs: JobsDep, state: StateDep) -> JSONResponse:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        limit = state.settings.max_upload_bytes
        async with request.form(max_files=1, max_fields=2, max_part_size=2**20) as form:
            spec = _parse(_json_part(form.get("job")), ("body", "job"))
            upload = form.get("candidates")
            if isinstance(spec, GenerateJobCreate):
                if upload is not None:
                    raise InvalidRequest("generate jobs take no candidates", ("candidates",))
                job = await jobs.create_generate(spec)
            else:
                if not isinstance(upload, UploadFile):
                    raise InvalidRequest(
                        "a filter job needs a `candidates` file part", ("candidates",)
                    )
                if upload.size is not None and upload.size > limit:
                    raise HTTPException(413, f"candidates exceed {limit} bytes")
                job = await jobs.create_filter(spec, upload.file)
    else:
        try:
            data = await request.json()
        except ValueError:
            raise InvalidRequest("the body must be JSON (or multipart for filter jobs)") from None
        spec = _parse(data, ("body",))
        if isinstance(spec, FilterJobCreate):
            raise InvalidRequest(
                "filter jobs upload their candidates: send multipart/form-data with a `job` "
                "part (this JSON) and a `candidates` file",
                ("type",),
            )
        job = await jobs.create_generate(spec)
    return JSONResponse(_public(job), 201, headers={"Location": f"/v1/jobs/{job['id']}"})


@router.get("", response_model=JobsPublic, summary="Jobs, newest first")
async def list_jobs(
    jobs: JobsDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    state: Annotated[
        str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")
    ] = None,
) -> dict[str, Any]:
    return {"jobs": [_public(job) for job in await jobs.list(limit, state)]}


@router.get("/{job_id}", response_model=JobPublic, summary="A job's state, progress and counts")
async def get_job(job_id: JobId, jobs: JobsDep) -> dict[str, Any]:
    return _public(await jobs.get(job_id))


@router.delete(
    "/{job_id}",
    response_model=JobPublic,
    summary="Cancel a job (its running shards stop within a second)",
    responses={409: {"description": "the job has already succeeded or failed"}},
)
async def cancel_job(job_id: JobId, jobs: JobsDep) -> dict[str, Any]:
    job = await jobs.cancel(job_id)
    if job["state"] in ("succeeded", "failed"):
        raise HTTPException(409, f"job {job_id} has already {job['state']}")
    return _public(job)


@router.get(
    "/{job_id}/events",
    summary="Server-sent events: state changes and progress; resumes from Last-Event-ID",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: JobId,
    jobs: JobsDep,
    last_event_id: Annotated[str | None, Header(pattern=r"^\d+-\d+$")] = None,
) -> StreamingResponse:
    await jobs.get(job_id)  # 404 before the stream starts

    async def frames() -> AsyncIterator[bytes]:
        async for event_id, name, data in jobs.store.events(job_id, last_event_id or "0"):
            yield encoding.sse_frame(event_id, name, data)

    return StreamingResponse(
        frames(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/{job_id}/result",
    summary="The result: .npy (default) or .safetensors (Accept: application/x-safetensors)",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"application/x-npy": {}, SAFETENSORS: {}},
            "description": "generate: the samples (n, *sample_shape) float32. filter: npy of "
            "`array` (indices by default; scores, log_ratio, final), safetensors all four",
        },
        409: {"description": "the job has not succeeded (yet)"},
    },
)
async def job_result(
    job_id: JobId,
    jobs: JobsDep,
    array: Annotated[str | None, Query(description="filter jobs: which array as .npy")] = None,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    as_safetensors = SAFETENSORS in (accept or "")
    chunks = await jobs.result(job_id, array, as_safetensors)
    suffix = "safetensors" if as_safetensors else "npy"
    return StreamingResponse(
        chunks,
        media_type=SAFETENSORS if as_safetensors else "application/x-npy",
        headers={"Content-Disposition": f'attachment; filename="{job_id}.{suffix}"'},
    )


def _json_part(part: Any) -> Any:
    if not isinstance(part, str):
        raise InvalidRequest("send the job as a form field `job` holding JSON", ("job",))
    try:
        return json.loads(part)
    except ValueError as error:
        raise InvalidRequest(f"the `job` part is not JSON: {error}", ("job",)) from None


def _parse(data: Any, where: tuple[str, ...]) -> GenerateJobCreate | FilterJobCreate:
    try:
        return _JOB.validate_python(data)
    except ValidationError as error:
        problems = [{**e, "loc": (*where, *e["loc"])} for e in error.errors(include_url=False)]
        raise RequestValidationError(problems) from None


def _public(job: dict[str, Any]) -> dict[str, Any]:
    return JobPublic.model_validate(job).model_dump(mode="json")
