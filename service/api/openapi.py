"""The OpenAPI document, complete: schemas that routes reference by hand (the bodies a
route parses itself, each method's params model) are added to its components, so every
`$ref` in the document resolves."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.batch.schemas import (
    FilterJobCreate,
    GenerateJobCreate,
    SbnFitJobCreate,
    SbpPruneJobCreate,
)
from service.online.schemas import PARAMS

REF_TEMPLATE = "#/components/schemas/{model}"


def install_openapi(app: FastAPI) -> None:
    extra: list[type[BaseModel]] = [
        GenerateJobCreate,
        FilterJobCreate,
        SbnFitJobCreate,
        SbpPruneJobCreate,
        *PARAMS.values(),
    ]

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, summary=app.summary,
                description=app.description, routes=app.routes,
            )  # fmt: skip
            _, schemas = models_json_schema(
                [(model, "validation") for model in extra], ref_template=REF_TEMPLATE
            )
            components = document.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in schemas.get("$defs", {}).items():
                components.setdefault(name, schema)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi
