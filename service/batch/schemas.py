"""Batch job bodies: `GenerateJobCreate` / `FilterJobCreate` in, `JobPublic` out."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from service.online.schemas import (
    MODEL_REF,
    REQUEST,
    Method,
    SampleCreate,
    request_dict,
    route_params,
)

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL = ("succeeded", "failed", "cancelled")


class GenerateJobCreate(BaseModel):
    """n samples from a generator, post-processed with a method, in final mode."""

    model_config = ConfigDict(
        **REQUEST,
        json_schema_extra={
            "examples": [
                {"type": "generate", "generator": "digits", "method": "imh", "n": 20000, "seed": 1}
            ]
        },
    )
    type: Literal["generate"]
    generator: Annotated[str, MODEL_REF]
    discriminator: Annotated[str, MODEL_REF] | None = None
    method: Method = "imh"
    n: int = Field(ge=1, description="samples to produce (limit: IMH_MAX_JOB_N)")
    steps: int | None = Field(None, ge=1)
    calibration: str | None = Field(None, max_length=64)
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="same seed and shard size, same samples"
    )
    params: Any = Field(None, description="the method's options, as in POST /v1/sample")

    @model_validator(mode="before")
    @classmethod
    def _route_params(cls, data: Any) -> Any:
        return route_params(data)

    @model_validator(mode="after")
    def _final_mode(self) -> GenerateJobCreate:
        if self.params is not None and self.params.mode == "stream":
            raise ValueError("jobs run in final mode: one sample per chain")
        return self

    def shard_request(self, n: int, seed: int) -> SampleCreate:
        body = {k: v for k, v in request_dict(self).items() if k not in ("type", "n", "seed")}
        return SampleCreate.model_validate({**body, "n": n, "seed": seed, "format": "npy"})


class FilterJobCreate(BaseModel):
    """Score an uploaded candidate set and keep what an MH chain (or DRS) over it accepts."""

    model_config = ConfigDict(
        **REQUEST,
        json_schema_extra={
            "examples": [
                {"type": "filter", "discriminator": "digits-d", "method": "imh", "seed": 0}
            ]
        },
    )
    type: Literal["filter"]
    discriminator: Annotated[str, MODEL_REF]
    calibration: str | None = Field(None, max_length=64)
    method: Literal["imh", "drs"] = "imh"
    chain_length: int | None = Field(
        None, ge=1, description="imh: candidates per independent chain (default: one chain "
        "over the whole set); each chain starts at its first candidate",
    )  # fmt: skip
    gamma: float | None = Field(None, description="drs: shift of F; 0 (default) is exact")
    gamma_percentile: float | None = Field(None, ge=0, le=100)
    seed: int | None = Field(None, ge=0, lt=2**63)

    @model_validator(mode="after")
    def _method_options(self) -> FilterJobCreate:
        if self.method == "imh" and (self.gamma is not None or self.gamma_percentile is not None):
            raise ValueError("gamma and gamma_percentile apply to method drs")
        if self.method == "drs" and self.chain_length is not None:
            raise ValueError("chain_length applies to method imh")
        if self.gamma is not None and self.gamma_percentile is not None:
            raise ValueError("give gamma or gamma_percentile, not both")
        return self


class _ClassifierJob(BaseModel):
    """A job on a loaded classifier (uploaded torch.export program or built-in), trained
    on the uploaded `data` file (x and y); `heldout` (x and y) is the report's data, else
    a seeded share of `data`; `ood` (x) gives the out-of-domain AUROC (sbn-fit)."""

    model_config = ConfigDict(**REQUEST)
    classifier: Annotated[str, MODEL_REF] = Field(description='"name" or "name:version"')
    output: Annotated[str, MODEL_REF] | None = Field(
        None, description="name of the new classifier (default <classifier>-sbn / -sbp)"
    )
    seed: int = Field(0, ge=0, lt=2**63, description="batches, split and noise")
    batch_size: int = Field(32, ge=2, le=4096)
    epochs: int | None = Field(None, ge=1, le=1000)
    held_out_fraction: float = Field(0.2, gt=0, lt=1, description="without a heldout file")

    def settings(self) -> dict[str, Any]:
        """The classifiers.* settings object's fields (defaults where not given)."""
        return self.model_dump(exclude={"type", "classifier", "output"}, exclude_none=True)


class SbnFitJobCreate(_ClassifierJob):
    """Stochastic Batch Normalization: the graph's batch norms become SBN, fitted on data."""

    model_config = ConfigDict(
        **REQUEST, json_schema_extra={"examples": [{"type": "sbn-fit", "classifier": "mynet"}]}
    )
    type: Literal["sbn-fit"]
    momentum: float = Field(0.1, gt=0, le=1, description="smoothing of the statistics")
    samples: int = Field(32, ge=1, le=256, description="K of the report and of predictions")


class SbpPruneJobCreate(_ClassifierJob):
    """Structured Bayesian Pruning, then a physically smaller torch.export program."""

    model_config = ConfigDict(
        **REQUEST, json_schema_extra={"examples": [{"type": "sbp-prune", "classifier": "mynet"}]}
    )
    type: Literal["sbp-prune"]
    lr: float = Field(1e-3, gt=0, le=1)
    sbp_lr_factor: float = Field(10.0, gt=0, le=1000, description="noise parameters learn faster")
    kl_weight: float = Field(1.0, ge=0, le=1000)
    checkpoint_every: int = Field(200, ge=10, le=100_000, description="steps between checkpoints")


ClassifierJobCreate = SbnFitJobCreate | SbpPruneJobCreate
CLASSIFIER_JOBS = TypeAdapter(
    Annotated[SbnFitJobCreate | SbpPruneJobCreate, Field(discriminator="type")]
)
JOB_TYPES = ("generate", "filter", "sbn-fit", "sbp-prune")
JobCreate = Annotated[
    GenerateJobCreate | FilterJobCreate | SbnFitJobCreate | SbpPruneJobCreate,
    Field(discriminator="type"),
]


class JobCounts(BaseModel):
    shards: int
    shards_done: int
    items: int = Field(description="samples (generate) or candidates (filter) in the job")
    items_done: int = Field(description="samples produced or candidates scored so far")
    proposals: int = Field(
        description="generate: points G and D evaluated; filter: candidates proposed to a chain"
    )
    chain_steps: int = Field(
        0, description="generate: steps taken by all chains; filter: as proposals"
    )
    accepted: int = Field(description="chain steps that moved; filter: candidates moved to")
    acceptance_rate: float | None


class JobPublic(BaseModel):
    id: str
    type: Literal["generate", "filter", "sbn-fit", "sbp-prune"]
    state: JobState
    progress: float = Field(ge=0, le=1, description="finished shards / shards")
    counts: JobCounts
    created_at: float = Field(description="Unix time")
    started_at: float | None
    finished_at: float | None
    error: str | None
    spec: dict[str, Any] = Field(description="the job as submitted, seed filled in")
    result: str | None = Field(description="where to GET the result once succeeded")
    output: str | None = Field(
        None, description="classifier jobs: the new classifier, name:version, once succeeded"
    )
    report: dict[str, Any] | None = Field(
        None, description="classifier jobs: accuracy, NLL, OOD AUROC or compression figures"
    )


class JobCreated(JobPublic):
    token: str = Field(
        description="the job's token: send it as X-IMH-Job-Token to read, follow, download "
        "or cancel the job (shown only here; the one you sent, if you sent one)"
    )


class JobsPublic(BaseModel):
    jobs: list[JobPublic]
