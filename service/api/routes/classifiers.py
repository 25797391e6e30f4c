"""GET /v1/classifiers, GET /v1/classifiers/{name}, POST /v1/classifiers/{name}/predict,
POST /v1/classifiers/{name}/sbn-fit (admin token).

predict takes a JSON body (ClassifyCreate) or `.npy` bytes (Content-Type
application/x-npy or application/octet-stream, options as query parameters), so the body
is parsed here rather than by FastAPI's JSON-only body parameter.
"""

from __future__ import annotations

from email.message import Message
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.api import encoding
from service.api.deps import ADMIN_ERRORS, AdminDep, StateDep
from service.classifiers.schemas import (
    ClassifierPublic,
    ClassifiersPublic,
    ClassifyCreate,
    ClassifyPublic,
)
from service.classifiers.service import ClassifierService, read_npy
from service.errors import InvalidRequest

router = APIRouter(prefix="/v1/classifiers", tags=["classifiers"])
NPY_TYPES = ("application/x-npy", "application/octet-stream")
INLINE_BYTES = 64 * 2**10  # bodies and answers up to this size are handled on the loop
CHUNK = 1 << 20

PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ClassifyCreate.model_json_schema()},
            "application/x-npy": {
                "schema": {"type": "string", "format": "binary"},
                "description": "np.save bytes of shape (N, *input_shape); samples and seed "
                "as query parameters",
            },
        },
    }
}
FIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "additionalProperties": False,
                    "properties": {
                        "inputs": {
                            "type": "string",
                            "format": "binary",
                            "description": ".npy training inputs (N, *input_shape)",
                        },
                        "batch_size": {
                            "type": "integer",
                            "description": "default: the manifest's training batch size, else 32",
                        },
                        "epochs": {"type": "integer", "description": "passes, default 3"},
                        "seed": {"type": "integer", "description": "batch order, default 0"},
                        "target": {"type": "string", "description": "default <name>-sbn"},
                    },
                }  # fmt: skip
            }
        },
    }
}


async def get_classifiers(state: StateDep) -> ClassifierService:
    if not state.runtime.ready:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            state.runtime.startup_error or "models are still loading; retry shortly",
            headers={"Retry-After": "1"},
        )
    return state.classifiers


ClassifiersDep = Annotated[ClassifierService, Depends(get_classifiers)]


@router.get("", response_model=ClassifiersPublic, summary="Every loaded classifier version")
async def list_classifiers(service: ClassifiersDep) -> ClassifiersPublic:
    return ClassifiersPublic(classifiers=[service.describe(model) for model in service.all()])


@router.get(
    "/{name}",
    response_model=ClassifierPublic,
    summary="A classifier: classes, input shape, uncertainty method, metrics, SBP report",
    responses={404: {"description": "no such classifier"}},
)
async def get_classifier(name: str, service: ClassifiersDep) -> ClassifierPublic:
    return service.describe(service.resolve(name))


@router.post(
    "/{name}/predict",
    response_model=ClassifyPublic,
    summary="Class probabilities, entropy and mutual information for a batch of inputs",
    openapi_extra=PREDICT_BODY,
    responses={
        404: {"description": "no such classifier"},
        413: {
            "description": "a JSON body larger than IMH_MAX_BODY_BYTES, or .npy bytes "
            "larger than IMH_MAX_UPLOAD_BYTES"
        },
        415: {"description": "neither JSON nor .npy"},
        422: {"description": "bad inputs (shape, NaN, not numbers) or options out of range"},
    },
)
async def predict(
    name: str,
    request: Request,
    service: ClassifiersDep,
    samples: Annotated[int | None, Query(ge=1, description="K (a JSON body's own wins)")] = None,
    seed: Annotated[
        int | None, Query(ge=0, lt=2**63, description="seed (a JSON body's own wins)")
    ] = None,
) -> Response:
    data = await request.body()  # bounded while read (service/api/middleware.py BodyLimits)
    media_type = _media_type(request.headers.get("content-type"))
    if media_type in NPY_TYPES:
        where = "query"
        inputs = await _off_loop(len(data), _npy_inputs, data)
    elif media_type == "application/json":
        where = "body"
        body = await _off_loop(len(data), _parse_json, data)
        # Options in the body win; the query fills in what the body leaves out.
        inputs = body.inputs
        samples = body.samples if body.samples is not None else samples
        seed = body.seed if body.seed is not None else seed
    else:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"send application/json or one of {list(NPY_TYPES)}, not {media_type!r}",
        )
    try:
        answer = await service.predict(name, inputs, samples, seed)
    except InvalidRequest as error:
        if error.field[:1] in (("samples",), ("seed",)):
            raise _validation_error(where, error.field, error.message) from None
        raise
    values = sum(len(p["probs"]) for p in answer["predictions"])
    content = await _off_loop(values * 24, encoding.json_bytes, answer)
    return Response(content, media_type="application/json")


@router.post(
    "/{name}/sbn-fit",
    response_model=ClassifierPublic,
    status_code=status.HTTP_201_CREATED,
    summary="Fit SBN statistics for a built-in BatchNorm classifier and store it as a new "
    "model, synchronously (admin token; for uploaded classifiers use an sbn-fit job)",
    openapi_extra=FIT_BODY,
    responses={
        400: {"description": "a multipart form that cannot be parsed"},
        **ADMIN_ERRORS,
        404: {"description": "no such classifier"},
        413: {"description": "upload larger than IMH_MAX_UPLOAD_BYTES"},
        422: {"description": "no BatchNorm layers, too few inputs, bad field"},
    },
)
async def sbn_fit(
    name: str, request: Request, _admin: AdminDep, state: StateDep, service: ClassifiersDep
) -> ClassifierPublic:
    limit = state.settings.max_upload_bytes
    if int(request.headers.get("content-length") or 0) > limit:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE, f"uploads are limited to {limit} bytes"
        )
    try:
        form = await request.form(max_files=2, max_fields=8)
    except Exception as error:  # noqa: BLE001 - any parse failure is the client's
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"not a multipart form: {error}") from None
    try:
        upload = form.get("inputs")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("send the training inputs as an .npy file field", ("inputs",))
        data = await _read_upload(upload, limit)
        inputs = await run_in_threadpool(read_npy, data, "inputs")
        target = form.get("target")
        if target is not None and not isinstance(target, str):
            raise InvalidRequest("target must be a text field", ("target",))
        options = {field: _form_int(form, field) for field in ("batch_size", "epochs", "seed")}
        model = await service.fit_sbn(
            name,
            inputs,
            store=state.settings.model_store,
            target=target or None,
            **{field: value for field, value in options.items() if value is not None},
        )
    finally:
        await form.close()
    return service.describe(model)


# Helpers -------------------------------------------------------------------------------


def _media_type(header: str | None) -> str:
    if not header:
        return "application/json"  # like FastAPI: a body without a type is read as JSON
    message = Message()
    message["content-type"] = header
    return message.get_content_type()


async def _read_upload(upload: UploadFile, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await upload.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise HTTPException(
                status.HTTP_413_CONTENT_TOO_LARGE, f"uploads are limited to {limit} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def _off_loop(size: int, function, *args) -> Any:
    """Small work inline; large parsing and encoding in a thread, off the event loop."""
    if size <= INLINE_BYTES:
        return function(*args)
    return await run_in_threadpool(function, *args)


def _parse_json(data: bytes) -> ClassifyCreate:
    try:
        return ClassifyCreate.model_validate_json(data)
    except ValidationError as error:
        # Only type, place and message: echoing the input would send the inputs back.
        raise RequestValidationError(
            [
                {"type": e["type"], "loc": ("body", *e["loc"]), "msg": e["msg"]}
                for e in error.errors(include_url=False)
            ]  # fmt: skip
        ) from None


def _npy_inputs(data: bytes) -> Any:
    try:
        return read_npy(data, "inputs")
    except InvalidRequest as error:
        raise _validation_error("body", error.field, error.message) from None


def _validation_error(where: str, field: tuple, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": (where, *field), "msg": message}])


def _form_int(form: Any, field: str) -> int | None:
    value = form.get(field)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{field} must be an integer", (field,)) from None
