"""Answers of the model routes (GET/POST/DELETE /v1/models)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ModelPublic(BaseModel):
    name: str
    version: str
    kind: str
    format: str
    description: str
    source: str = Field(description="zoo (built in) or store (IMH_MODEL_STORE)")
    latest: bool
    calibrations: list[str] | None = None
    manifest: dict[str, Any]
    warnings: list[str] = Field(
        default_factory=list, description="what will not work yet (an upload's missing partner)"
    )
    compiled: bool = Field(
        False, description="runs torch.compile'd code (IMH_COMPILE or the manifest's compile)"
    )
    compile_note: str | None = Field(
        None, description="where it runs eager instead, and why: a failed or mismatched "
        "compile, or the warm-up sizes where compiled was not faster",
    )  # fmt: skip


class ModelsPublic(BaseModel):
    models: list[ModelPublic]
    load_errors: dict[str, str] = Field(description="model folders skipped at start, and why")


class ModelVersionsPublic(BaseModel):
    name: str
    versions: list[ModelPublic]


class ModelDeleted(BaseModel):
    name: str
    version: str
    kind: str
    source: str = Field(description="zoo (built in) or store (IMH_MODEL_STORE)")
    files_removed: bool = Field(description="the version's folder was deleted from the store")
    detail: str
