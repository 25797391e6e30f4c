"""From a method name, models and per-request options to a kernel and its first state.

This is the one place that knows each method's options and defaults; the online
engine, batch jobs and benchmarks all start chains through `prepare`.

Example:
    >>> models = Models(generator=G, latent_dim=2, log_ratio=calibrated_logit, real=x_heldout)
    >>> kernel, state = prepare("imh", models, {"init": "real"}, Noise.seeded(0, 512))
    >>> result = run_final(kernel, state, noise, steps=50)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from samplers import drs, imh, mala, markov, pcn, proposals
from samplers._core import Kernel, Noise

DEFAULTS: dict[str, dict[str, Any]] = {
    "none": {},
    "imh": {"init": "real"},
    "drs": {"gamma": 0.0, "gamma_percentile": None, "eps": 1e-6},
    "markov": {"init": "real", "scale": 0.1},
    "pcn": {"beta": 0.5},
    "mala": {"step_size": 0.01},
}
METHODS = tuple(DEFAULTS)


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


def options(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method's defaults overridden by `params`; unknown keys are refused."""
    if method not in DEFAULTS:
        raise MethodError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    merged = dict(DEFAULTS[method])
    unknown = set(params or {}) - set(merged)
    if unknown:
        raise MethodError(f"unknown option(s) {sorted(unknown)} for method {method!r}")
    merged.update({k: v for k, v in (params or {}).items() if v is not None})
    return merged


def _real_rows(models: Models, noise: Noise) -> torch.Tensor:
    """One held-out real sample per row, chosen by the row's own stream."""
    index = (noise.uniform() * len(models.real)).long().clamp(max=len(models.real) - 1)
    return models.real.to(noise.device)[index]


def _starts_real(models: Models, init: str) -> bool:
    if init not in ("real", "generator"):
        raise MethodError(f"init must be 'real' or 'generator', not {init!r}")
    return init == "real" and models.real is not None and len(models.real) > 0


def _need(value: Any, what: str, method: str) -> Any:
    if value is None:
        raise MethodError(f"method {method!r} needs {what}")
    return value


def prepare(
    method: str,
    models: Models,
    params: dict[str, Any] | None,
    noise: Noise,
    pilot_logits: torch.Tensor | None = None,
) -> tuple[Kernel, Any]:
    """Build the kernel and the initial state of noise.batch_size chains.

    `pilot_logits` (drs only) lets callers cache the 10k-proposal pilot per model pair.
    """
    opts = options(method, params)
    propose = proposals.independent(models.generator, models.latent_dim)
    if method == "none":  # raw generator: every fresh proposal is accepted
        zero = _zero_log_ratio
        return imh.build(propose, zero), imh.init_generator(propose, zero, noise)
    if method == "markov":
        log_pair = _need(models.log_pair, "a pair discriminator d(x, y)", method)
        move = models.markov_proposal or proposals.gaussian_perturbation
        if models.markov_proposal is None and not opts["scale"] > 0:
            raise MethodError("markov scale must be > 0")
        kernel = markov.build(move, log_pair)
        if _starts_real(models, opts["init"]):
            return kernel, markov.init_real(_real_rows(models, noise), opts["scale"])
        return kernel, markov.init_generator(propose, noise, opts["scale"])
    log_ratio = _need(models.log_ratio, "a discriminator D(x)", method)
    if method == "imh":
        kernel = imh.build(propose, log_ratio)
        if _starts_real(models, opts["init"]):
            return kernel, imh.init_real(_real_rows(models, noise), log_ratio)
        return kernel, imh.init_generator(propose, log_ratio, noise)
    if method == "drs":
        if pilot_logits is None:
            pilot_logits = drs_pilot(models, log_ratio, noise.device)
        gamma = opts["gamma"]
        if opts["gamma_percentile"] is not None:
            gamma = drs.gamma_for_percentile(pilot_logits, opts["gamma_percentile"], opts["eps"])
        with torch.inference_mode():
            sample_like = models.generator(
                torch.zeros(noise.batch_size, models.latent_dim, device=noise.device)
            )
        return drs.build(propose, log_ratio), drs.init(
            sample_like, pilot_logits.max(), gamma, opts["eps"]
        )
    if method == "pcn":
        if not 0 < opts["beta"] <= 1:
            raise MethodError("pcn beta must lie in (0, 1]")
        state = pcn.init(models.generator, log_ratio, noise, models.latent_dim, opts["beta"])
        return pcn.build(models.generator, log_ratio), state
    # mala
    if not opts["step_size"] > 0:
        raise MethodError("mala step_size must be > 0")
    state = mala.init(models.generator, log_ratio, noise, models.latent_dim, opts["step_size"])
    return mala.build(models.generator, log_ratio), state


def drs_pilot(
    models: Models, log_ratio: Callable[[torch.Tensor], torch.Tensor], device: torch.device
) -> torch.Tensor:
    """The DRS pilot on its own fixed stream, so a cached pilot equals a fresh one."""
    propose = proposals.independent(models.generator, models.latent_dim)
    return drs.pilot(propose, log_ratio, Noise.seeded(0, 2000, device))


def _zero_log_ratio(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(x), device=x.device)
