"""From a sampling request to what a scheduler group runs: models, options, plan.

`resolve` picks concrete models (a request keeps them even if the registry changes
later), fills method defaults (request > generator manifest's `sampler_defaults` >
`samplers.methods.DEFAULTS`) and says which group the request joins. `MethodPlan`
starts chains through `samplers.methods.prepare`, the one place that knows each method.

Rules worth knowing:
- the discriminator defaults to the generator's (`"discriminator"` in its manifest, else
  one registered for it); markov prefers a pair discriminator registered for the
  generator and its proposal (a learned conditional one, or a Gaussian of given scale);
  with a sample discriminator markov runs the independent case d(x, y) = D(x)(1 - D(y));
- calibration defaults to the discriminator's `default_calibration`, else "none".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from samplers import Noise, markov, proposals
from samplers.methods import DEFAULTS, MethodError, Models, drs_pilot, prepare
from service.errors import InvalidRequest
from service.models.loading import LoadedModel
from service.models.manifests import DiscriminatorManifest, GaussianProposal
from service.models.registry import Registry, split_ref
from service.online.chains import JobSpec
from service.online.schemas import SampleCreate

DEFAULT_STEPS = 20
DEFAULT_STREAM_CHAINS = 256


@dataclass(frozen=True)
class Resolved:
    """A request with its models and options fixed; `key` names its scheduler group."""

    body: SampleCreate
    generator: LoadedModel
    discriminator: LoadedModel | None
    proposal: LoadedModel | None  # markov with a learned conditional proposal
    proposal_kind: str | None  # markov: gaussian, conditional or independent
    calibration: str | None
    options: dict[str, Any]  # what samplers.methods.prepare takes for this method
    steps: int
    seed: int
    stream: bool
    chains: int  # final: n; stream: concurrent chains

    @property
    def method(self) -> str:
        return self.body.method

    @property
    def key(self) -> tuple:
        uid = lambda model: model.uid if model is not None else None  # noqa: E731
        return (
            uid(self.generator), uid(self.discriminator), self.method, self.calibration,
            self.proposal_kind, uid(self.proposal),
        )  # fmt: skip


def resolve(registry: Registry, body: SampleCreate, seed: int, stream: bool) -> Resolved:
    """Raises ModelNotFound or InvalidRequest (naming the field) for what cannot run."""
    generator = registry.get(body.generator, kind="generator")
    method, params = body.method, body.params
    discriminator = None if method == "none" else _discriminator(registry, generator, body)
    defaults = generator.manifest.sampler_defaults.get(method, {})
    options = {k: v for k, v in defaults.items() if k in DEFAULTS[method]}
    options.update(
        {
            k: v
            for k, v in params.model_dump(exclude_none=True).items()
            if k in DEFAULTS[method] and v is not None
        }
    )
    proposal, proposal_kind = None, None
    if method == "markov":
        proposal, proposal_kind = _markov_proposal(registry, discriminator, params, options)
    mode = params.mode or ("stream" if stream else "final")
    steps = body.steps or int(defaults.get("steps", DEFAULT_STEPS))
    chains = body.n
    if mode == "stream":
        chains = params.chains or min(body.n, DEFAULT_STREAM_CHAINS)
    elif params.chains is not None:
        raise InvalidRequest("chains applies to stream mode only", ("params", method, "chains"))
    return Resolved(
        body, generator, discriminator, proposal, proposal_kind,
        calibration_for(discriminator, body.calibration), options,
        0 if method == "none" and mode == "final" else steps, seed, mode == "stream", chains,
    )  # fmt: skip


def _discriminator(registry: Registry, generator: LoadedModel, body: SampleCreate) -> LoadedModel:
    if body.discriminator is not None:
        model = registry.get(body.discriminator, kind="discriminator")
        trained_for = split_ref(model.manifest.generator)[0]
        if trained_for != generator.name:
            raise InvalidRequest(
                f"{model.ref} was trained for generator {trained_for!r}, not {generator.name!r}",
                ("discriminator",),
            )
        if model.manifest.input == "pair" and body.method != "markov":
            raise InvalidRequest(
                f"{model.ref} is a pair discriminator d(x, y); method {body.method!r} needs "
                "a sample discriminator D(x)",
                ("discriminator",),
            )
        return model
    if body.method == "markov":
        pairs = registry.discriminators_for(generator, "pair")
        if pairs:
            return pairs[0]
    named = generator.manifest.discriminator
    if named is not None:
        return registry.get(named, kind="discriminator")
    samples = registry.discriminators_for(generator, "sample")
    if not samples:
        raise InvalidRequest(
            f"{generator.ref} has no discriminator; name one or use method 'none'",
            ("discriminator",),
        )
    return samples[0]


def calibration_for(discriminator: LoadedModel | None, requested: str | None) -> str | None:
    if discriminator is None:
        return None
    name = requested or discriminator.manifest.default_calibration or "none"
    if name not in discriminator.calibrators:
        raise InvalidRequest(
            f"calibration {name!r} is not available for {discriminator.ref}; "
            f"choose one of {sorted(discriminator.calibrators)}",
            ("calibration",),
        )
    return name


def _markov_proposal(
    registry: Registry, discriminator: LoadedModel, params: Any, options: dict[str, Any]
) -> tuple[LoadedModel | None, str]:
    manifest: DiscriminatorManifest = discriminator.manifest
    field = ("params", "markov", "proposal")
    if manifest.input == "sample":
        if params.proposal not in (None, "independent"):
            raise InvalidRequest(
                f"{discriminator.ref} is a sample discriminator: markov can only use the "
                "independent proposal with it (or name a pair discriminator)",
                field,
            )
        return None, "independent"
    trained = manifest.proposal
    kind = "conditional" if isinstance(trained, str) else "gaussian"
    if params.proposal not in (None, kind):
        raise InvalidRequest(
            f"{discriminator.ref} was trained for a {kind} proposal, not {params.proposal!r}",
            field,
        )
    if kind == "conditional":
        return registry.get(trained, kind="proposal"), kind
    if isinstance(trained, GaussianProposal):
        options.setdefault("scale", trained.scale)
    return None, kind


def request_options_error(error: MethodError, method: str) -> InvalidRequest:
    return InvalidRequest(str(error), ("params", method))


class MethodPlan:
    """Starts chains for one group; built in the group's thread (the drs pilot runs here)."""

    def __init__(
        self, resolved: Resolved, pilot_cache: dict[tuple, torch.Tensor], device: torch.device
    ):
        self.method = resolved.method
        self.models = build_models(resolved)
        self.pilot_logits = None
        if self.method == "drs":
            key = resolved.key
            if key not in pilot_cache:
                pilot_cache[key] = drs_pilot(self.models, self.models.log_ratio, device)
            self.pilot_logits = pilot_cache[key]

    def start(self, spec: JobSpec, noise: Noise) -> tuple[Any, Any]:
        try:
            return prepare(self.method, self.models, spec.options, noise, self.pilot_logits)
        except MethodError as error:
            raise request_options_error(error, self.method) from None

    def fallback_rows(self, state: Any) -> int:
        return int((~state.has_sample).sum()) if self.method == "drs" else 0


def build_models(resolved: Resolved) -> Models:
    generator = resolved.generator
    manifest = generator.manifest
    log_ratio = log_pair = markov_proposal = None
    discriminator = resolved.discriminator
    if discriminator is not None and discriminator.manifest.input == "sample":
        log_ratio = calibrated_logit(discriminator, resolved.calibration)
    if discriminator is not None and discriminator.manifest.input == "pair":
        log_pair = pair_log_d(discriminator)
    if resolved.proposal_kind == "independent":
        propose = proposals.independent(generator.module, manifest.latent_dim)
        log_pair = markov.independent_pair(log_ratio)
        markov_proposal = lambda y, noise, scale: propose(noise)  # noqa: E731
    elif resolved.proposal_kind == "conditional":
        markov_proposal = proposals.conditional(
            resolved.proposal.module, resolved.proposal.manifest.noise_dim
        )
    return Models(
        generator=generator.module,
        latent_dim=manifest.latent_dim,
        log_ratio=log_ratio,
        log_pair=log_pair,
        markov_proposal=markov_proposal,
        real=generator.real_samples,
    )


def calibrated_logit(discriminator: LoadedModel, calibration: str) -> Callable:
    module, calibrate = discriminator.module, _own_copy(discriminator.calibrators[calibration])

    def log_ratio(x: torch.Tensor) -> torch.Tensor:
        return calibrate(module(x).reshape(len(x)))

    return log_ratio


def _own_copy(calibrator: Callable) -> Callable:
    """A fresh calibrator for each group: calibrators cache lookup tables built in whatever
    autograd mode they were first called in, and a table built under inference mode (by
    an imh group) breaks the gradients mala takes through the same calibrator."""
    to_dict = getattr(calibrator, "to_dict", None)
    if to_dict is None:
        return calibrator
    from discriminators.calibration import calibrator_from_dict

    return calibrator_from_dict(to_dict())


def pair_log_d(discriminator: LoadedModel) -> Callable:
    module = discriminator.module
    as_logit = discriminator.manifest.output_kind == "logit"

    def log_pair(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = module(x, y).reshape(len(x))
        return F.logsigmoid(out) if as_logit else out

    return log_pair
