"""GET/POST /v1/models, GET /v1/models/{name}, DELETE /v1/models/{name}/{version}."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.api.deps import ADMIN_ERRORS, AdminDep, StateDep
from service.api.schemas import ModelDeleted, ModelPublic, ModelsPublic, ModelVersionsPublic
from service.models.loading import LoadedModel
from service.models.registry import Registry

log = logging.getLogger("imh.models")

router = APIRouter(prefix="/v1/models", tags=["models"])
MAX_FILES = 16
CHUNK = 1 << 20

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "manifest"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "description": "model name"},
                        "version": {"type": "string", "description": "default: next integer"},
                        "replace": {"type": "boolean", "description": "replace that version"},
                        "manifest": {"type": "string", "format": "binary"},
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "every file the manifest names",
                        },
                    },
                }
            }
        },
    }
}


def public(model: LoadedModel, registry: Registry) -> ModelPublic:
    versions = registry.versions(model.name)
    calibrations = sorted(model.calibrators) if model.kind == "discriminator" else None
    return ModelPublic(
        name=model.name,
        version=model.version,
        kind=model.kind,
        format=model.manifest.format,
        description=model.manifest.description,
        source=model.source,
        latest=bool(versions) and versions[-1] is model,
        calibrations=calibrations,
        manifest=model.manifest.public(),
        compiled=model.compiled,
        compile_note=model.compile_note,
    )


@router.get("", response_model=ModelsPublic, summary="Every loaded model, all versions")
async def list_models(state: StateDep) -> ModelsPublic:
    registry = state.registry
    return ModelsPublic(
        models=[public(model, registry) for model in registry.all()],
        load_errors={
            str(Path(folder).relative_to(Path(folder).parents[1])): why
            for folder, why in registry.load_errors.items()
        },
    )


@router.get(
    "/{name}",
    response_model=ModelVersionsPublic,
    summary="The loaded versions of one model",
    responses={404: {"description": "no such model"}},
)
async def get_model(name: str, state: StateDep) -> ModelVersionsPublic:
    versions = state.registry.versions(name)
    if not versions:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no model {name!r} is loaded")
    return ModelVersionsPublic(name=name, versions=[public(m, state.registry) for m in versions])


@router.post(
    "",
    response_model=ModelPublic,
    status_code=status.HTTP_201_CREATED,
    summary="Upload a model: multipart manifest plus files (admin token)",
    openapi_extra=UPLOAD_BODY,
    responses={
        400: {"description": "bad manifest or files, or the model fails its smoke test"},
        **ADMIN_ERRORS,
        409: {"description": "that version exists (send replace=true)"},
        413: {"description": "upload larger than IMH_MAX_UPLOAD_BYTES"},
        415: {"description": "a file would need unpickling; refused"},
    },
)
async def upload_model(request: Request, state: StateDep, _admin: AdminDep) -> ModelPublic:
    limit = state.settings.max_upload_bytes
    if int(request.headers.get("content-length") or 0) > limit:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE, f"uploads are limited to {limit} bytes"
        )
    try:
        form = await request.form(max_files=MAX_FILES + 1, max_fields=8)
    except Exception as error:  # noqa: BLE001 - any parse failure is the client's
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"not a multipart form: {error}") from None
    try:
        name = _text(form.get("name"), "name")
        version = form.get("version")
        replace = str(form.get("replace") or "false").lower() in ("1", "true", "yes")
        manifest = form.get("manifest")
        uploads = [item for item in form.getlist("files") if isinstance(item, UploadFile)]
        if manifest is None:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "the form needs a manifest field")
        with tempfile.TemporaryDirectory(prefix="imh-upload-") as folder:
            files = {"manifest.json": await _save(manifest, Path(folder) / "manifest.json", limit)}
            for upload in uploads:
                file_name = _file_name(upload.filename)
                if file_name in files:
                    raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{file_name} sent twice")
                files[file_name] = await _save(upload, Path(folder) / file_name, limit)
            model = await run_in_threadpool(
                state.registry.install,
                state.settings.model_store,
                name,
                _text(version, "version") if version is not None else None,
                files,
                replace,
            )
    finally:
        await form.close()
    await state.runtime.announce_model("install", model.name, model.version)
    answer = public(model, state.registry)
    return answer.model_copy(update={"warnings": state.registry.missing_partners(model)})


@router.delete(
    "/{name}/{version}",
    response_model=ModelDeleted,
    summary="Delete a version: unload it and remove an uploaded model's files (admin token)",
    responses={
        **ADMIN_ERRORS,
        404: {"description": "no such model"},
        409: {"description": "a built-in model, and IMH_ALLOW_ZOO_DELETE is off"},
    },
)
async def delete_model(
    name: str,
    version: str,
    state: StateDep,
    _admin: AdminDep,
    keep_files: Annotated[
        bool, Query(description="only unload: the model is back at the next restart")
    ] = False,
) -> ModelDeleted:
    registry, settings = state.registry, state.settings
    store = None if keep_files else settings.model_store
    model, removed = await run_in_threadpool(
        registry.remove, name, version, store, settings.allow_zoo_delete
    )
    await state.runtime.announce_model("remove", name, version)
    if not registry.versions(name):
        state.metrics.forget_model(name)
    detail = (
        "unloaded and its files deleted: it is gone for good" if removed
        else "unloaded until the next restart (its files were kept)"
    )  # fmt: skip
    return ModelDeleted(
        name=model.name, version=model.version, kind=model.kind, source=model.source,
        files_removed=removed, detail=detail,
    )  # fmt: skip


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{field} must be a non-empty text field")
    return value


def _file_name(file_name: str | None) -> str:
    if not file_name or PurePosixPath(file_name).name != file_name or file_name.startswith("."):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, f"file name {file_name!r} must be a plain file name"
        )
    return file_name


async def _save(item: UploadFile | str, path: Path, limit: int) -> Path:
    """Write a form item to `path`, refusing more than `limit` bytes."""
    written = 0
    with path.open("wb") as out:
        if isinstance(item, str):
            out.write(item.encode())
            return path
        while chunk := await item.read(CHUNK):
            written += len(chunk)
            if written > limit:
                raise HTTPException(
                    status.HTTP_413_CONTENT_TOO_LARGE, f"uploads are limited to {limit} bytes"
                )
            out.write(chunk)
    return path
