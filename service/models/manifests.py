"""Model manifests: `<store>/<name>/<version>/manifest.json`, one pydantic model per kind.

Two formats:
- "torch.export": `file` is a `.pt2` program written by `torch.export.save` with a
  dynamic batch dimension (the user's own GAN);
- "zoo": `architecture` names a class marked `@architecture`, `config` its keyword
  arguments, `weights` a `.safetensors` file.

Example (a user's generator and its discriminator):
    {"kind": "generator", "format": "torch.export", "file": "generator.pt2",
     "latent_dim": 2, "sample_shape": [2]}
    {"kind": "discriminator", "format": "torch.export", "file": "discriminator.pt2",
     "generator": "mygan", "input": "sample", "output": "logit"}

Unknown keys are kept (zoo manifests carry training notes and metrics) but never
interpreted. Every file a manifest names is a plain file name inside the model's folder
with an extension that loads without unpickling.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

KINDS = ("generator", "discriminator", "proposal", "classifier", "features")
# Bounds checked before anything is allocated: a manifest cannot make the smoke test (or
# a zoo architecture's constructor) ask for gigabytes.
MAX_DIM = 65536  # a latent, noise or feature size, or one axis of a sample
MAX_SAMPLE_VALUES = 2**24  # values of one sample or input (a 3 x 2048 x 2048 image fits)
MAX_CONFIG_CHARS = 65536  # a zoo architecture's config, as JSON


def _bounded_shape(shape: list[int]) -> list[int]:
    values = 1
    for size in shape:
        values *= size
    if values > MAX_SAMPLE_VALUES:
        raise ValueError(f"a shape of {values} values is larger than {MAX_SAMPLE_VALUES}")
    return shape


Dim = Annotated[int, Field(ge=1, le=MAX_DIM)]
Shape = Annotated[list[Dim], Field(min_length=1, max_length=8), AfterValidator(_bounded_shape)]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # model names and versions: path-safe
_NAME = re.compile(NAME_PATTERN)


def valid_name(text: str) -> bool:
    """A whole model name or version matches NAME_PATTERN (a trailing newline does not)."""
    return isinstance(text, str) and _NAME.fullmatch(text) is not None


# Which extensions each file field may use; none of them is a pickle format.
FILE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "file": (".pt2",),
    "weights": (".safetensors",),
    "real_samples": (".safetensors", ".npz"),
    "reference_stats": (".npz",),
    "calibration": (".json",),
}


def _file_name(value: str | None, field: str) -> str | None:
    if value is None:
        return None
    path = PurePosixPath(value)
    if path.name != value or value in (".", "..") or "\\" in value:
        raise ValueError(f"{field} must be a plain file name inside the model folder")
    if not value.endswith(FILE_SUFFIXES[field]):
        raise ValueError(f"{field} must end with one of {list(FILE_SUFFIXES[field])}")
    return value


def _own_weights(name: str) -> bool:
    from architectures import ArchitectureError, carries_own_weights

    try:
        return carries_own_weights(name)
    except ArchitectureError as error:
        raise ValueError(str(error)) from None


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, frozen=True)

    kind: str
    format: Literal["torch.export", "zoo"]
    description: str = ""
    file: str | None = None  # torch.export
    architecture: str | None = None  # zoo
    config: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None
    # Generators, discriminators, proposals, features: true compiles with torch.compile
    # wherever warmed, false never; unset follows IMH_COMPILE (service.models.compiled).
    compile: bool | None = None

    @field_validator("config")
    @classmethod
    def _small_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value)) > MAX_CONFIG_CHARS:
            raise ValueError(f"config is longer than {MAX_CONFIG_CHARS} characters of JSON")
        return value

    @field_validator("file", "weights")
    @classmethod
    def _check_model_files(cls, value: str | None, info: Any) -> str | None:
        return _file_name(value, info.field_name)

    @model_validator(mode="after")
    def _format_fields(self) -> Self:
        if self.format == "torch.export" and self.file is None:
            raise ValueError('a "torch.export" manifest needs "file": "<program>.pt2"')
        if self.format == "zoo" and self.architecture is None:
            raise ValueError('a "zoo" manifest needs "architecture"')
        if self.format == "zoo" and self.weights is None and not _own_weights(self.architecture):
            raise ValueError('a "zoo" manifest needs "weights" (a .safetensors file)')
        return self

    def files(self) -> list[str]:
        """Every file this manifest needs beside itself."""
        names = [self.file, self.weights] + [
            getattr(self, field, None)
            for field in FILE_SUFFIXES
            if field not in ("file", "weights")
        ]
        return [name for name in names if name is not None]

    def public(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class GaussianProposal(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)
    type: Literal["gaussian"]
    scale: float = Field(gt=0)


class GeneratorManifest(_Manifest):
    kind: Literal["generator"]
    latent_dim: Dim
    sample_shape: Shape
    discriminator: str | None = None  # default discriminator's name
    real_samples: str | None = None  # held-out real rows ("x"): imh/markov chain starts only
    reference_stats: str | None = None  # pytorch-fid .npz (mu, sigma) for the running FID
    features: str | None = None  # name of the "features" model those stats were computed with
    value_range: tuple[float, float] | None = None
    image: bool | None = None
    sampler_defaults: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("real_samples", "reference_stats")
    @classmethod
    def _check_data_files(cls, value: str | None, info: Any) -> str | None:
        return _file_name(value, info.field_name)

    @property
    def is_image(self) -> bool:
        if self.image is not None:
            return self.image
        return len(self.sample_shape) == 3 and self.sample_shape[0] in (1, 3)


class DiscriminatorManifest(_Manifest):
    kind: Literal["discriminator"]
    generator: str
    input: Literal["sample", "pair"] = "sample"
    # sample: the logit of D(x). pair: "log_d" is log d(x, y); "logit" is logit d(x, y).
    output: Literal["logit", "log_d"] | None = None
    calibration: str | None = None
    default_calibration: str | None = None
    proposal: str | GaussianProposal | None = None  # pair only: what d(x, y) was trained for

    @field_validator("calibration")
    @classmethod
    def _check_calibration_file(cls, value: str | None, info: Any) -> str | None:
        return _file_name(value, info.field_name)

    @model_validator(mode="after")
    def _input_output(self) -> Self:
        if self.input == "sample" and self.output == "log_d":
            raise ValueError('a sample discriminator outputs "logit"')
        if self.input == "sample" and self.proposal is not None:
            raise ValueError('"proposal" belongs to pair discriminators')
        return self

    @property
    def output_kind(self) -> str:
        return self.output or ("logit" if self.input == "sample" else "log_d")


class ProposalManifest(_Manifest):
    kind: Literal["proposal"]
    generator: str
    noise_dim: Dim


class ClassifierManifest(_Manifest):
    kind: Literal["classifier"]
    classes: list[Any] = Field(min_length=1, max_length=MAX_DIM)
    input_shape: Shape
    value_range: tuple[float, float] | None = None  # of the inputs; default [0, 1]
    uncertainty: str = "none"
    transform: Literal["sbn"] | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)


class FeaturesManifest(_Manifest):
    kind: Literal["features"]
    feature_dim: Dim


Manifest = Annotated[
    GeneratorManifest
    | DiscriminatorManifest
    | ProposalManifest
    | ClassifierManifest
    | FeaturesManifest,
    Field(discriminator="kind"),
]
MANIFEST = TypeAdapter(Manifest)


def parse_manifest(text: str | bytes) -> Manifest:
    """Validate manifest JSON; raises pydantic.ValidationError naming the bad field."""
    return MANIFEST.validate_json(text)
