"""What a scheduler group runs for a resolved request: its models as the kernels see
them (calibrated logit, pair log-density, proposals), and the plan that starts chains
through `samplers.methods.prepare`, the one place that knows each method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

from samplers import Noise, markov, proposals
from samplers.methods import TABLE, MethodError, Models, drs_pilot, prepare
from service.errors import InvalidRequest
from service.models.loading import LoadedModel
from service.online.chains import BlockSpec
from service.online.resolve import Resolved


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
            key = resolved.key[:-1]  # the models and calibration, whatever the lane
            if key not in pilot_cache:
                pilot_cache[key] = drs_pilot(self.models, self.models.log_ratio, device)
            self.pilot_logits = pilot_cache[key]

    def start(self, spec: BlockSpec, noise: Noise) -> tuple[Any, Any]:
        try:
            return prepare(
                self.method, self.models, spec.options, noise, self.pilot_logits, steps=spec.steps
            )
        except MethodError as error:
            raise request_options_error(error, self.method) from None

    def points_per_step(self, options: dict[str, Any]) -> int:
        """Points (G and D evaluations) one chain's step proposes: i-SIR's new particles,
        Ex2MCMC's particles and MALA steps; 1 for the others."""
        spec = TABLE[self.method]
        return spec.proposals_per_step(spec.validate(options))

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
