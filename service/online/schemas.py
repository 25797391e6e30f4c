"""Sampling request and answer bodies (pydantic v2). `XCreate` comes in, `XPublic` goes out.

The methods and their options come from `samplers.methods.TABLE`, the one list of
methods: each method's `params` model (`ImhParams`, `PcnParams`, ...) is built here from
the options its kernel module declares, plus the options every method takes (mode,
chains, thin). A new kernel module is a new method of the API with nothing written here.

Requests forbid unknown keys and non-finite numbers, and carry Field constraints, so a
bad value gets a 422 whose `loc` names the field, e.g. ["body", "params", "beta"]. Limits
that depend on settings (n, steps, chains) are checked by the service layer and
answered the same way.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import annotated_types
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)

from samplers.methods import METHODS, TABLE

Method = Literal[METHODS]  # type: ignore[valid-type]
# Strict: JSON's types as they are (false is no 0, "3" no 3).
REQUEST = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
MODEL_REF = Field(min_length=1, max_length=201, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


class CommonParams(BaseModel):
    """Options every method takes: how results come back."""

    model_config = REQUEST
    mode: Literal["final", "stream"] | None = Field(
        None,
        description="final: one sample per chain after `steps` steps (default for "
        "/v1/sample). stream: emit newly accepted states (default for /v1/sample/stream).",
    )
    chains: int | None = Field(None, ge=1, description="stream mode: chains (default min(n, 256))")
    thin: int = Field(1, ge=1, le=10_000, description="stream mode: emit on every thin-th step")


def _params_model(method: str) -> type[CommonParams]:
    spec = TABLE[method]
    fields: dict[str, Any] = {
        option.name: (
            option.constrained(annotated_types.Interval) | None,
            Field(None, description=f"{option.description} (default: {option.default})"),
        )
        for option in spec.options
    }
    name = "".join(part.capitalize() for part in method.split("_")) + "Params"
    return create_model(name, __base__=CommonParams, __doc__=spec.summary, **fields)


PARAMS: dict[str, type[CommonParams]] = {method: _params_model(method) for method in METHODS}


class PngOptions(BaseModel):
    model_config = REQUEST
    scale: int = Field(4, ge=1, le=16, description="each pixel drawn as scale x scale pixels")
    columns: int | None = Field(None, ge=1, le=256, description="default: a near-square grid")


class SampleCreate(BaseModel):
    """POST /v1/sample and /v1/sample/stream."""

    model_config = ConfigDict(
        **REQUEST,
        json_schema_extra={
            "examples": [{"generator": "toy25", "method": "imh", "n": 16, "steps": 50, "seed": 0}]
        },
    )
    generator: Annotated[str, MODEL_REF] = Field(description='"name" or "name:version"')
    discriminator: Annotated[str, MODEL_REF] | None = Field(
        None, description="default: the generator's default (for markov: its pair discriminator)"
    )
    method: Method = Field("imh", description="see GET /v1/methods")
    n: int = Field(64, ge=1, description="samples to return (limit: IMH_MAX_N)")
    steps: int | None = Field(None, ge=1, description="steps per chain (default 20; IMH_MAX_STEPS)")
    calibration: str | None = Field(
        None, max_length=64, description="none, isotonic, logistic or beta (what D ships)"
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="same seed, same samples")
    format: Literal["json", "npy", "png"] = "json"
    strict: bool = Field(
        False, description="fail with a 422 instead of answering with warnings (chains that "
        "did not mix, DRS rows that spent their proposal budget)",
    )  # fmt: skip
    png: PngOptions | None = Field(None, description="format png: how the grid is drawn")
    params: Any = Field(
        None,
        description="the method's options: the `<Method>Params` schema of the chosen method",
        json_schema_extra={"anyOf": [{"$ref": f"#/components/schemas/{m.__name__}"}
                                     for m in PARAMS.values()] + [{"type": "null"}]},
    )  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _route_params(cls, data: Any) -> Any:
        return route_params(data)


def route_params(data: Any) -> Any:
    """Validate `params` with the options model of the request's method (the top-level
    `method` selects it), so errors name the option: ["body", "params", "beta"]."""
    if not isinstance(data, dict):
        return data
    method, params = data.get("method", "imh"), data.get("params")
    if not isinstance(method, str) or method not in PARAMS or isinstance(params, CommonParams):
        return data  # an unknown method gets its own error from the `method` field
    try:
        return {**data, "params": PARAMS[method].model_validate(params or {})}
    except ValidationError as error:
        problems = [
            {"type": e["type"], "loc": ("params", *e["loc"]), "input": e["input"],
             **({"ctx": e["ctx"]} if "ctx" in e else {})}
            for e in error.errors(include_url=False)
        ]  # fmt: skip
        raise ValidationError.from_exception_data("SampleCreate", problems) from None


def request_dict(body: BaseModel) -> dict[str, Any]:
    """A request as JSON-ready data that validates back to an equal request."""
    return body.model_dump(mode="json", exclude_none=True)


class SampleStats(BaseModel):
    method: str
    n: int
    proposals: int = Field(
        description="points evaluated by G and D (an i-SIR step proposes particles - 1, an "
        "Ex2MCMC step those plus its MALA steps; the others 1 per chain step)"
    )
    chain_steps: int = Field(description="steps taken by all chains together (drs: trials)")
    accepted: int = Field(description="chain steps that moved (drs: accepted trials)")
    acceptance_rate: float = Field(description="accepted / chain_steps")
    seconds: float
    restarted: int = Field(description="chains that needed the restart round")
    fallback: int = Field(
        description="drs: rows that spent their proposal budget without an acceptance "
        "(their output is no DRS sample; see warnings)"
    )
    mode: str
    steps: int
    seed: int
    generator: str = Field(description="resolved name:version")
    discriminator: str | None
    calibration: str | None
    r_hat: float | None = Field(
        None, description="split R-hat of the chains' traced scalar after warm-up (null: "
        "not a chain method, or too few steps)",
    )  # fmt: skip
    ess: float | None = Field(None, description="effective sample size of that trace")
    trace: str | None = Field(
        None, description="the scalar traced per chain: log target (latent methods) or "
        "calibrated logit (imh); null for drs (i.i.d. trials), markov and none",
    )  # fmt: skip
    diagnostics_note: str | None = Field(None, description="why r_hat and ess are null")
    warnings: list[str] = Field(
        default_factory=list, description="what the answer does not deliver (chains that "
        "did not mix, DRS rows out of budget)",
    )  # fmt: skip


class SamplePublic(BaseModel):
    samples: list[Any] = Field(description="n samples, each of the generator's sample_shape")
    stats: SampleStats
