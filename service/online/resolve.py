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

import math
from dataclasses import dataclass
from typing import Any

from samplers.methods import DEFAULTS, TABLE, MethodError
from service.errors import InvalidRequest, check_limit
from service.models.loading import LoadedModel
from service.models.manifests import DiscriminatorManifest, GaussianProposal
from service.models.registry import Registry, split_ref
from service.online.schemas import SampleCreate
from service.settings import Settings

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
    lane: str = "interactive"  # "bulk": large requests and job shards (their own group)

    @property
    def proposals_per_chain(self) -> int:
        """The most points one chain may evaluate: steps x points per step (i-SIR
        particles, Ex2MCMC's MALA steps), or a drs row's proposal budget."""
        return chain_work(self.method, self.options, self.steps)

    @property
    def method(self) -> str:
        return self.body.method

    @property
    def key(self) -> tuple:
        uid = lambda model: model.uid if model is not None else None  # noqa: E731
        return (
            uid(self.generator), uid(self.discriminator), self.method, self.calibration,
            self.proposal_kind, uid(self.proposal), self.lane,
        )  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (IMH_MAX_* settings); beyond: a 422 naming the field."""

    max_n: int
    max_steps: int
    max_chains: int
    max_proposals: int
    max_result_bytes: int
    interactive_rows: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            settings.max_n, settings.max_steps, min(settings.max_chains, settings.max_queued_rows),
            settings.max_proposals, settings.max_result_bytes, settings.interactive_rows,
        )  # fmt: skip


def resolve(
    registry: Registry, body: SampleCreate, seed: int, stream: bool, limits: Limits
) -> Resolved:
    """Raises ModelNotFound or InvalidRequest (naming the field) for what cannot run."""
    check_limit(body.n, limits.max_n, ("n",))
    generator = registry.get(body.generator, kind="generator")
    method, params = body.method, body.params
    discriminator = None if method == "none" else _discriminator(registry, generator, body)
    defaults = generator.manifest.sampler_defaults.get(method, {})
    options = {k: v for k, v in defaults.items() if k in DEFAULTS[method]}
    given = params.model_dump(include=set(DEFAULTS[method]), exclude_none=True)
    options.update(given)
    try:
        TABLE[method].validate(options)
    except MethodError as error:
        raise InvalidRequest(str(error), ("params",)) from None
    proposal, proposal_kind = None, None
    if method == "markov":
        proposal, proposal_kind = _markov_proposal(registry, discriminator, params, options)
    mode = params.mode or ("stream" if stream else "final")
    if stream and mode == "final":
        raise InvalidRequest(
            "/v1/sample/stream streams; for one sample per chain use POST /v1/sample",
            ("params", "mode"),
        )
    steps = body.steps or int(defaults.get("steps", DEFAULT_STEPS))
    chains = body.n
    if mode == "stream":
        chains = params.chains or min(body.n, DEFAULT_STREAM_CHAINS)
    elif params.chains is not None:
        raise InvalidRequest("chains applies to stream mode only", ("params", "chains"))
    if method == "none" and mode == "final":
        steps = 0  # the first proposals are the samples
    check_limit(steps, limits.max_steps, ("steps",))
    _check_work(body, generator, mode, chains, chain_work(method, options, steps), limits)
    return Resolved(
        body, generator, discriminator, proposal, proposal_kind,
        calibration_for(discriminator, body.calibration), options, steps, seed,
        mode == "stream", chains, "bulk" if chains > limits.interactive_rows else "interactive",
    )  # fmt: skip


def chain_work(method: str, options: dict[str, Any], steps: int) -> int:
    spec = TABLE[method]
    options = spec.validate(options)
    if "max_proposals_per_sample" in options:  # drs: rows propose until they accept
        return options["max_proposals_per_sample"]
    return max(steps, 1) * spec.proposals_per_step(options)


def _check_work(
    body: SampleCreate, generator: LoadedModel, mode: str, chains: int, work: int, limits: Limits
) -> None:
    """Limits on steps, chains, proposals and answer size; formats that cannot work."""
    if mode == "stream":
        check_limit(chains, limits.max_chains, ("params", "chains"))
        if body.format != "json":
            raise InvalidRequest("stream mode answers in JSON only", ("format",))
    what = "proposals: n (or chains) x steps x proposals per step (drs: x its budget)"
    check_limit(chains * work, limits.max_proposals, ("steps",), what)
    manifest = generator.manifest
    shape = manifest.sample_shape
    what = f"the answer's bytes ({body.n} samples of shape {shape}, float32)"
    check_limit(body.n * math.prod(shape) * 4, limits.max_result_bytes, ("n",), what)
    if body.format == "png" and not manifest.is_image:
        raise InvalidRequest(f"{generator.ref} does not make images; use json or npy", ("format",))


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
    field = ("params", "proposal")
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
