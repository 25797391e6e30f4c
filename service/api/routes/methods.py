"""GET /v1/methods: the post-processing methods and their options, from the samplers'
method table (the page's method form and clients read it)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from samplers.methods import TABLE
from service.online.schemas import PARAMS

router = APIRouter(prefix="/v1", tags=["sample"])


class MethodPublic(BaseModel):
    name: str
    summary: str
    needs: list[str] = Field(description="what the method needs besides a generator")
    params: dict[str, Any] = Field(description="JSON schema of the method's `params` object")


class MethodsPublic(BaseModel):
    methods: list[MethodPublic]


@router.get("/methods", response_model=MethodsPublic, summary="Methods and their options")
async def list_methods() -> MethodsPublic:
    return MethodsPublic(
        methods=[
            MethodPublic(
                name=name,
                summary=spec.summary,
                needs=list(spec.needs),
                params=PARAMS[name].model_json_schema(),
            )  # fmt: skip
            for name, spec in TABLE.items()
        ]
    )
