"""Request and response bodies of the classifier endpoints (pydantic v2).

`ClassifyCreate` comes in (POST /v1/classifiers/{name}/predict as JSON); `ClassifyPublic`
and `ClassifierPublic` go out. The inputs are checked by the service layer (shape,
numbers only, finite), because their shape depends on the classifier.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_REQUEST = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class ClassifyCreate(BaseModel):
    """POST /v1/classifiers/{name}/predict with a JSON body."""

    model_config = ConfigDict(
        **_REQUEST,
        json_schema_extra={"examples": [{"inputs": [[[[0.0] * 8] * 8]], "samples": 32, "seed": 0}]},
    )
    inputs: list[Any] = Field(
        min_length=1,
        description="numbers of shape (N, *input_shape), or (*input_shape) for one input",
    )
    samples: int | None = Field(
        None,
        ge=1,
        description="SBN classifiers: stochastic passes K per input (default: the "
        "manifest's default_samples, else 32; at most its max_samples). Others: ignored",
    )
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="SBN classifiers: same seed, same answer"
    )


class ClassPrediction(BaseModel):
    probs: list[float] = Field(description="predictive probabilities, one per class")
    label: Any = Field(description="the most probable class, as the manifest's classes name it")
    entropy: float = Field(description="entropy of probs, nats")
    mutual_information: float = Field(
        description="entropy minus the mean entropy of the K passes (0 when deterministic)"
    )


class ClassifyPublic(BaseModel):
    model: str = Field(description="resolved name:version")
    uncertainty: Literal["sbn", "none"]
    samples: int = Field(description="stochastic passes per input (1 when deterministic)")
    seed: int | None = Field(description="the seed used (null when deterministic)")
    predictions: list[ClassPrediction]


class SamplesPublic(BaseModel):
    default: int
    max: int


class SbpReport(BaseModel):
    """What Structured Bayesian Pruning did to the network, from its manifest's `sbp`."""

    model_config = ConfigDict(extra="allow")
    layers: list[str] | None = None
    units_before: list[int] | None = None
    units_after: list[int] | None = None
    params_before: int | None = None
    params_after: int | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    params_reduction: float | None = None
    flops_reduction: float | None = None
    accuracy: float | None = Field(None, description="held-out accuracy of the compressed net")
    original_accuracy: float | None = Field(None, description="held-out accuracy before pruning")
    speedup: dict[str, float] = Field(
        default_factory=dict, description="measured speed-up by batch size (see `speed`)"
    )


class ClassifierPublic(BaseModel):
    name: str
    version: str
    description: str
    source: str = Field(description="zoo (built in) or store (IMH_MODEL_STORE)")
    latest: bool
    uncertainty: Literal["sbn", "none"]
    classes: list[Any]
    input_shape: list[int]
    samples: SamplesPublic | None = Field(None, description="SBN: default and largest K")
    metrics: dict[str, Any] = Field(description="as measured on the held-out split")
    sbn: dict[str, Any] | None = Field(None, description="how the SBN statistics were fitted")
    sbp: SbpReport | dict[str, Any] | None = Field(None, description="compression report")
    original: str | None = Field(None, description="the model this one was derived from")
    compressed: str | None = Field(None, description="its SBP-compressed version")


class ClassifiersPublic(BaseModel):
    classifiers: list[ClassifierPublic]
