"""What a method declares about itself: its options, what it needs, how it starts.

Each kernel module ends with one `METHOD = MethodSpec(...)`; `samplers.methods.TABLE`
collects them, so a new method is one module plus one line in that table. An `Option`
says everything a request model needs (python type or choices, default, bounds, whether
the string "auto" is allowed, a one-line description) and validates a value itself, so
the table both checks options here and can be turned into pydantic fields elsewhere:

    >>> option = Option("beta", float, 0.5, "step in (0, 1]", gt=0, le=1)
    >>> option.annotation, option.constraints
    (<class 'float'>, {'gt': 0, 'le': 1})
    >>> fields = {o.name: (o.constrained(Field), Field(o.default, description=o.description))
    ...           for o in TABLE["mala"].options}
    >>> MalaParams = pydantic.create_model("MalaParams", **fields)
    >>> option.check(1.5)
    Traceback (most recent call last):
    MethodError: option 'beta' must be <= 1, not 1.5
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch

from samplers import proposals
from samplers._core import Kernel, Noise

AUTO = "auto"


class MethodError(ValueError):
    """A method cannot run with these models or options (a client error)."""


@dataclass(frozen=True)
class Models:
    """What a method may use; which fields are required depends on the method."""

    generator: Callable[[torch.Tensor], torch.Tensor]
    latent_dim: int
    log_ratio: Callable[[torch.Tensor], torch.Tensor] | None = None  # calibrated l(x)
    log_pair: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # log d(x,y)
    markov_proposal: proposals.MarkovProposal | None = None  # None: Gaussian perturbation
    real: torch.Tensor | None = None  # held-out real samples, only ever chain starts


@dataclass(frozen=True)
class Option:
    """One option of one method.

    type: float, int, str or bool. choices: the allowed values (then `annotation` is a
    Literal). gt/ge/lt/le: numeric bounds. auto: the string "auto" is allowed too (the
    method then picks the value itself). nullable: None is a value of its own (not just
    "use the default"), e.g. drs' gamma_percentile.
    """

    name: str
    type: type
    default: Any
    description: str
    choices: tuple[Any, ...] | None = None
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    auto: bool = False
    nullable: bool = False

    @property
    def annotation(self) -> Any:
        """The python type a request model should declare (without Optional)."""
        base: Any = Literal[self.choices] if self.choices else self.type
        if self.auto:
            base = base | Literal["auto"]
        return base | None if self.nullable else base

    def constrained(self, marker: Callable[..., Any]) -> Any:
        """`annotation` with the bounds attached to its numeric part, as
        Annotated[type, marker(gt=..., ...)]: with marker = pydantic.Field this is a
        request model's field type (bounds on "auto" itself would not validate)."""
        base: Any = Literal[self.choices] if self.choices else self.type
        if self.constraints:
            base = Annotated[base, marker(**self.constraints)]
        if self.auto:
            base = base | Literal["auto"]
        return base | None if self.nullable else base

    @property
    def constraints(self) -> dict[str, float]:
        """The numeric bounds, as pydantic Field keyword arguments."""
        bounds = {"gt": self.gt, "ge": self.ge, "lt": self.lt, "le": self.le}
        return {k: v for k, v in bounds.items() if v is not None}

    def check(self, value: Any) -> Any:
        """The value if it is allowed, else MethodError naming the option."""
        if value is None and self.nullable:
            return None
        if self.auto and value == AUTO:
            return AUTO
        if self.choices is not None:
            if value not in self.choices:
                raise self._error(f"must be one of {list(self.choices)}, not {value!r}")
            return value
        value = self._typed(value)
        for name, ok, word in (
            ("gt", lambda b: value > b, ">"),
            ("ge", lambda b: value >= b, ">="),
            ("lt", lambda b: value < b, "<"),
            ("le", lambda b: value <= b, "<="),
        ):
            bound = getattr(self, name)
            if bound is not None and not ok(bound):
                raise self._error(f"must be {word} {bound:g}, not {value!r}")
        return value

    def _typed(self, value: Any) -> Any:
        want = self.type.__name__ + (' or "auto"' if self.auto else "")
        if isinstance(value, bool) and self.type is not bool:
            raise self._error(f"must be {want}, not {value!r}")
        if self.type is float and isinstance(value, int | float):
            if not math.isfinite(value):
                raise self._error(f"must be finite, not {value!r}")
            return float(value)
        if isinstance(value, self.type):
            return value
        raise self._error(f"must be {want}, not {value!r}")

    def _error(self, message: str) -> MethodError:
        return MethodError(f"option {self.name!r} {message}")


# start(models, options, noise, steps, pilot_logits) -> (kernel, first state). `steps` is
# the request's steps per chain (None when unknown); `pilot_logits` only matters to drs.
Start = Callable[[Models, dict[str, Any], Noise, int | None, Any], tuple[Kernel, Any]]


@dataclass(frozen=True)
class MethodSpec:
    """A method as the rest of the project sees it.

    needs: the Models fields the method cannot run without ("log_ratio", "log_pair").
    proposals_per_step(options): candidate points each row evaluates per step (G and D
    forwards; for Langevin steps also a backward), for reporting compute per sample.
    resolve(given, merged): rules between options (one excludes another); returns the
    options the method starts with.
    """

    name: str
    summary: str
    start: Start
    options: tuple[Option, ...] = ()
    needs: tuple[str, ...] = ()
    proposals_per_step: Callable[[dict[str, Any]], int] = field(default=lambda options: 1)
    resolve: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        return {option.name: option.default for option in self.options}

    def validate(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """The defaults overridden by `params` (None values mean "default"), checked."""
        by_name = {option.name: option for option in self.options}
        given = {k: v for k, v in (params or {}).items() if v is not None}
        unknown = sorted(set(params or {}) - set(by_name))
        if unknown:
            raise MethodError(f"unknown option(s) {unknown} for method {self.name!r}")
        merged = self.defaults | {k: by_name[k].check(v) for k, v in given.items()}
        return self.resolve(given, merged) if self.resolve else merged


def need(models: Models, field_name: str, what: str, method: str) -> Any:
    value = getattr(models, field_name)
    if value is None:
        raise MethodError(f"method {method!r} needs {what}")
    return value


def real_rows(models: Models, noise: Noise) -> torch.Tensor:
    """One held-out real sample per row, chosen by the row's own stream."""
    index = (noise.uniform() * len(models.real)).long().clamp(max=len(models.real) - 1)
    return models.real.to(noise.device)[index]


def starts_real(models: Models, init: str) -> bool:
    """Whether chains start at held-out real samples (init "real" and the model has some)."""
    return init == "real" and models.real is not None and len(models.real) > 0
