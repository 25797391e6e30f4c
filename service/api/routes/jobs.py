"""Batch jobs: POST /v1/jobs, GET /v1/jobs[/{id}[/events|/result]], DELETE /v1/jobs/{id}.

A generate job is a JSON body. The others upload files, as multipart/form-data with a
`job` part (the JSON) and:
- filter: a `candidates` file (.npy or .safetensors);
- sbn-fit, sbp-prune: a `data` file (safetensors or .npz with x and y), optionally
  `heldout` (x and y) and `ood` (x).

A job belongs to a token: the one the client sent as X-IMH-Job-Token when it created
the job, or one the server made and returned in the answer (`token`, shown once). Reading
a job, its events and its result, and cancelling it, need that token (or the admin
token as `Authorization: Bearer`); the listing shows the jobs of the token sent.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import UploadFile

from service.api import encoding
from service.api.deps import JobsDep, StateDep, is_admin
from service.batch.schemas import (
    FilterJobCreate,
    GenerateJobCreate,
    JobCreate,
    JobCreated,
    JobPublic,
    JobsPublic,
)
from service.batch.service import JobAccess, new_token
from service.errors import InvalidRequest

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{1,64}$", description="the id POST returned")]
TokenHeader = Annotated[
    str,
    Header(alias="X-IMH-Job-Token", max_length=256,
           description="the job's token (POST: choose your own, else one is made)"),
]  # fmt: skip
LastEventId = Annotated[
    str, Header(pattern=r"^(\d+-\d+)?$", description="resume after this event id")
]
SAFETENSORS = "application/x-safetensors"
_JOB = TypeAdapter(JobCreate)
_FILE = {"type": "string", "format": "binary"}
_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["job"],
    "additionalProperties": False,
    "properties": {
        "job": {
            "oneOf": [
                {"$ref": f"#/components/schemas/{name}"}
                for name in ("FilterJobCreate", "SbnFitJobCreate", "SbpPruneJobCreate")
            ]
        },
        "candidates": {**_FILE, "description": "filter: .npy or .safetensors, (N, ...)"},
        "data": {**_FILE, "description": "sbn-fit, sbp-prune: safetensors or .npz, x and y"},
        "heldout": {**_FILE, "description": "optional held-out x and y for the report"},
        "ood": {**_FILE, "description": "sbn-fit, optional: out-of-domain x"},
    },
}
UPLOADS = ("candidates", "data", "heldout", "ood")
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/GenerateJobCreate"}},
            "multipart/form-data": {
                "schema": _MULTIPART_SCHEMA,
                "encoding": {"job": {"contentType": "application/json"}},
            },
        },
    }
}
_NEED_TOKEN = {
    403: {"description": "the job belongs to another token"},
    404: {"description": "no such job (unknown, or expired)"},
    422: {"description": "a malformed job id or token"},
    503: {"description": "Redis is unreachable or models are loading"},
}


async def job_access(
    state: StateDep,
    token: TokenHeader = "",
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> JobAccess:
    return JobAccess(token or None, is_admin(state.settings, authorization))


AccessDep = Annotated[JobAccess, Depends(job_access)]


@router.post(
    "",
    status_code=201,
    response_model=JobCreated,
    summary="Submit a generate job (JSON), or a filter, sbn-fit or sbp-prune job "
    "(multipart upload)",
    openapi_extra=_BODY,
    responses={
        400: {"description": "a multipart form that cannot be parsed (or has extra parts)"},
        404: {"description": "unknown generator or discriminator"},
        413: {"description": "the body is larger than IMH_MAX_BODY_BYTES (JSON) or "
              "IMH_MAX_UPLOAD_BYTES (multipart)"},
        415: {"description": "neither JSON nor multipart/form-data"},
        422: {"description": "a field or the candidate file is invalid"},
        503: {"description": "Redis is unreachable or models are loading"},
    },
)  # fmt: skip
async def create_job(request: Request, jobs: JobsDep, access: AccessDep) -> JSONResponse:
    access = JobAccess(access.token or new_token(), access.admin)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        async with request.form(max_files=3, max_fields=1, max_part_size=2**20) as form:
            spec = _parse(_json(form.get("job"), ("job",)), ("body", "job"))
            files = {name: form.get(name) for name in UPLOADS if form.get(name) is not None}
            job = await _create_with_files(jobs, spec, files, access)
    elif content_type.startswith("application/json") or not content_type:
        spec = _parse(_json(await request.body(), ()), ("body",))
        if not isinstance(spec, GenerateJobCreate):
            raise InvalidRequest(
                f"{spec.type} jobs upload files: send multipart/form-data with a `job` part "
                "(this JSON) and the files",
                ("type",),
            )
        job = await jobs.create_generate(spec, access)
    else:
        raise HTTPException(415, "send JSON, or multipart/form-data for jobs with files")
    answer = {**_public(job), "token": access.token}
    return JSONResponse(answer, 201, headers={"Location": f"/v1/jobs/{job['id']}"})


@router.get(
    "",
    response_model=JobsPublic,
    summary="The jobs of the token sent, newest first (all of them for the admin)",
    responses={422: {"description": "a malformed token"}, 503: _NEED_TOKEN[503]},
)
async def list_jobs(
    jobs: JobsDep,
    access: AccessDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    state: Annotated[
        str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")
    ] = None,
) -> dict[str, Any]:
    return {"jobs": [_public(job) for job in await jobs.list(limit, state, access)]}


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    summary="A job's state, progress and counts",
    responses=_NEED_TOKEN,
)
async def get_job(job_id: JobId, jobs: JobsDep, access: AccessDep) -> dict[str, Any]:
    return _public(await jobs.get(job_id, access))


@router.delete(
    "/{job_id}",
    response_model=JobPublic,
    summary="Delete a job: cancel it if it still runs (its shards stop within a second), "
    "then forget it and its result",
    responses=_NEED_TOKEN,
)
async def delete_job(job_id: JobId, jobs: JobsDep, access: AccessDep) -> dict[str, Any]:
    return _public(await jobs.delete(job_id, access))


@router.get(
    "/{job_id}/events",
    summary="Server-sent events: state changes and progress; resumes from Last-Event-ID",
    response_class=StreamingResponse,
    responses={**_NEED_TOKEN, 200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: JobId,
    jobs: JobsDep,
    access: AccessDep,
    last_event_id: LastEventId = "",
) -> StreamingResponse:
    await jobs.get(job_id, access)  # 403/404 before the stream starts

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
        **_NEED_TOKEN,
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
    access: AccessDep,
    array: Annotated[
        Literal["indices", "scores", "log_ratio", "final", "samples"] | None,
        Query(
            description="which array as .npy: a filter job's indices (default), scores, "
            "log_ratio or final; a generate job has only its samples"
        ),
    ] = None,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    as_safetensors = SAFETENSORS in (accept or "")
    chunks = await jobs.result(job_id, array, as_safetensors, access)
    suffix = "safetensors" if as_safetensors else "npy"
    return StreamingResponse(
        chunks,
        media_type=SAFETENSORS if as_safetensors else "application/x-npy",
        headers={"Content-Disposition": f'attachment; filename="{job_id}.{suffix}"'},
    )


async def _create_with_files(
    jobs: JobsDep, spec: Any, files: dict[str, Any], access: JobAccess
) -> dict[str, Any]:
    wanted = {FilterJobCreate: {"candidates"}, GenerateJobCreate: set()}.get(
        type(spec), {"data", "heldout", "ood"}
    )
    for name, item in files.items():
        if name not in wanted:
            raise InvalidRequest(f"{spec.type} jobs take no `{name}` part", (name,))
        if not isinstance(item, UploadFile):
            raise InvalidRequest(f"`{name}` must be a file part", (name,))
    if isinstance(spec, GenerateJobCreate):
        return await jobs.create_generate(spec, access)
    if isinstance(spec, FilterJobCreate):
        if "candidates" not in files:
            raise InvalidRequest("a filter job needs a `candidates` file part", ("candidates",))
        return await jobs.create_filter(spec, files["candidates"].file, access)
    uploads = {name: await item.read() for name, item in files.items()}
    return await jobs.create_classifier_job(spec, uploads, access)


def _json(part: Any, field: tuple[str, ...]) -> Any:
    """JSON text or bytes as data; any malformed input (bad encoding, nesting too deep
    for the parser) is a 422 naming the part."""
    if part is None or isinstance(part, UploadFile):
        raise InvalidRequest("send the job as a form field `job` holding JSON", ("job",))
    try:
        return json.loads(part)
    except (ValueError, RecursionError) as error:
        where = "the `job` part" if field else "the body"
        raise InvalidRequest(f"{where} is not valid JSON: {str(error)[:200]}", field) from None


def _parse(data: Any, where: tuple[str, ...]) -> GenerateJobCreate | FilterJobCreate:
    try:
        return _JOB.validate_python(data)
    except (ValidationError, RecursionError) as error:
        if isinstance(error, RecursionError):
            raise InvalidRequest("the job is nested too deeply", where[1:]) from None
        problems = [{**e, "loc": (*where, *e["loc"])} for e in error.errors(include_url=False)]
        raise RequestValidationError(problems) from None


def _public(job: dict[str, Any]) -> dict[str, Any]:
    return JobPublic.model_validate(job).model_dump(mode="json")
