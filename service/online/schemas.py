"""Request and response bodies (pydantic v2). `XCreate` comes in, `XPublic` goes out.

Requests forbid unknown keys and non-finite numbers, and carry Field constraints, so a
bad value gets a 422 whose `loc` names the field, e.g. ["body", "params", "pcn", "beta"].
Limits that depend on settings (n, steps, chains) are checked by the service layer and
answered the same way.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from samplers.methods import METHODS

Method = Literal["none", "imh", "drs", "markov", "pcn", "mala"]
_REQUEST = ConfigDict(extra="forbid", allow_inf_nan=False, strict=False)
_MODEL_REF = Field(min_length=1, max_length=201, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


class _Params(BaseModel):
    """Options every method takes: how results come back."""

    model_config = _REQUEST
    method: str  # filled in from the request's method: it selects the params model
    mode: Literal["final", "stream"] | None = Field(
        None,
        description="final: one sample per chain after `steps` steps (default for "
        "/v1/sample). stream: emit newly accepted states (default for /v1/sample/stream).",
    )
    chains: int | None = Field(None, ge=1, description="stream mode: chains (default min(n, 256))")
    thin: int = Field(1, ge=1, le=10_000, description="stream mode: emit on every thin-th step")


class NoneParams(_Params):
    method: Literal["none"]


class ImhParams(_Params):
    method: Literal["imh"]
    init: Literal["real", "generator"] | None = Field(
        None, description="chain start: held-out real samples (MH-GAN, default) or G"
    )


class DrsParams(_Params):
    method: Literal["drs"]
    gamma: float | None = Field(None, description="fixed shift of F; 0 is exact rejection sampling")
    gamma_percentile: float | None = Field(
        None, ge=0, le=100, description="gamma as this percentile of F over the pilot (DRS paper)"
    )
    eps: float | None = Field(None, gt=0, le=1, description="keeps log(1 - exp(.)) finite")

    @model_validator(mode="after")
    def _one_gamma(self) -> DrsParams:
        if self.gamma is not None and self.gamma_percentile is not None:
            raise ValueError("give gamma or gamma_percentile, not both")
        return self


class MarkovParams(_Params):
    method: Literal["markov"]
    init: Literal["real", "generator"] | None = None
    proposal: Literal["gaussian", "conditional", "independent"] | None = Field(
        None, description="default: what the pair discriminator was trained for"
    )
    scale: float | None = Field(None, gt=0, le=1e3, description="Gaussian proposal scale")


class PcnParams(_Params):
    method: Literal["pcn"]
    beta: float | None = Field(None, gt=0, le=1, description="step in (0, 1]; 1 is independent")


class MalaParams(_Params):
    method: Literal["mala"]
    step_size: float | None = Field(None, gt=0, le=10, description="Langevin step size")


MethodParams = Annotated[
    NoneParams | ImhParams | DrsParams | MarkovParams | PcnParams | MalaParams,
    Field(discriminator="method"),
]


class SampleCreate(BaseModel):
    """POST /v1/sample and /v1/sample/stream."""

    model_config = ConfigDict(
        **_REQUEST,
        json_schema_extra={
            "examples": [{"generator": "toy25", "method": "imh", "n": 16, "steps": 50, "seed": 0}]
        },
    )
    generator: Annotated[str, _MODEL_REF] = Field(description='"name" or "name:version"')
    discriminator: Annotated[str, _MODEL_REF] | None = Field(
        None, description="default: the generator's default (for markov: its pair discriminator)"
    )
    method: Method = "imh"
    n: int = Field(64, ge=1, description="samples to return (limit: IMH_MAX_N)")
    steps: int | None = Field(None, ge=1, description="steps per chain (default 20; IMH_MAX_STEPS)")
    calibration: str | None = Field(
        None, max_length=64, description="none, isotonic, logistic or beta (what D ships)"
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="same seed, same samples")
    format: Literal["json", "npy", "png"] = "json"
    params: MethodParams = Field(None, description="method options; see the method's schema")

    @model_validator(mode="before")
    @classmethod
    def _route_params(cls, data: Any) -> Any:
        return route_params(data)


def request_dict(body: BaseModel) -> dict[str, Any]:
    """A request as JSON-ready data that validates back to an equal request.

    (Dumps carry params.method, which only the validator may set.)
    """
    data = body.model_dump(mode="json", exclude_none=True)
    if isinstance(data.get("params"), dict):
        data["params"] = {k: v for k, v in data["params"].items() if k != "method"}
    return data


def route_params(data: Any) -> Any:
    """Tag params with the method so the right options model validates them."""
    if not isinstance(data, dict):
        return data
    method = data.get("method", "imh")
    params = data.get("params")
    if params is None:
        params = {}
    if isinstance(params, dict) and "method" in params:
        raise ValueError("params.method is not an option: set the top-level method")
    if isinstance(params, dict) and method in METHODS:
        return {**data, "params": {**params, "method": method}}
    return {k: v for k, v in data.items() if k != "params"} if method not in METHODS else data


class SampleStats(BaseModel):
    method: str
    n: int
    proposals: int
    accepted: int
    acceptance_rate: float
    seconds: float
    restarted: int = Field(description="chains that needed the restart round")
    fallback: int = Field(description="drs rows with no accepted proposal (latest one returned)")
    mode: str
    steps: int
    seed: int
    generator: str = Field(description="resolved name:version")
    discriminator: str | None
    calibration: str | None


class SamplePublic(BaseModel):
    samples: list[Any] = Field(description="n samples, each of the generator's sample_shape")
    stats: SampleStats


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


class ModelsPublic(BaseModel):
    models: list[ModelPublic]
    load_errors: dict[str, str] = Field(description="model folders skipped at start, and why")


class ModelVersionsPublic(BaseModel):
    name: str
    versions: list[ModelPublic]


class Message(BaseModel):
    detail: str
