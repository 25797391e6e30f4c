"""From a method name, models and per-request options to a kernel and its first state.

`TABLE` is the one list of methods: each kernel module declares its options, needs and
start once (`samplers.spec.MethodSpec`), and everything else derives from the table:
`METHODS`, `DEFAULTS`, option checks here, request models in the service. A new method
is one new module plus one line below.

Example:
    >>> models = Models(generator=G, latent_dim=2, log_ratio=calibrated_logit, real=x_heldout)
    >>> noise = Noise.seeded(0, 512)
    >>> kernel, state = prepare("imh", models, {"init": "real"}, noise, steps=50)
    >>> result = run_final(kernel, state, noise, steps=50)
    >>> TABLE["pcn"].options[0]  # Option(name='beta', type=float, default=0.5, ...)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from samplers import drs, ex2mcmc, imh, isir, mala, markov, pcn
from samplers._core import Kernel, Noise
from samplers.spec import MethodError, MethodSpec, Models, Option

__all__ = [
    "DEFAULTS",
    "METHODS",
    "TABLE",
    "MethodError",
    "MethodSpec",
    "Models",
    "Option",
    "drs_pilot",
    "options",
    "prepare",
]

TABLE: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        imh.RAW,
        imh.METHOD,
        drs.METHOD,
        markov.METHOD,
        pcn.METHOD,
        mala.METHOD,
        isir.METHOD,
        ex2mcmc.METHOD,
    )
}
METHODS = tuple(TABLE)
DEFAULTS: dict[str, dict[str, Any]] = {name: spec.defaults for name, spec in TABLE.items()}


def spec(method: str) -> MethodSpec:
    if method not in TABLE:
        raise MethodError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    return TABLE[method]


def options(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method's defaults overridden by `params`, checked (MethodError naming the
    option that is unknown, of the wrong type or out of bounds)."""
    return spec(method).validate(params)


def prepare(
    method: str,
    models: Models,
    params: dict[str, Any] | None,
    noise: Noise,
    pilot_logits: torch.Tensor | None = None,
    *,
    steps: int | None = None,
) -> tuple[Kernel, Any]:
    """Build the kernel and the initial state of noise.batch_size chains.

    `pilot_logits` (drs only) lets callers cache the 10k-proposal pilot per model pair.
    `steps`: the request's steps per chain; adaptive methods (mala and ex2mcmc with
    step_size "auto") warm up for the first half of them (their option `warmup`).
    """
    method_spec = spec(method)
    opts = method_spec.validate(params)
    return method_spec.start(models, opts, noise, steps, pilot_logits)


def drs_pilot(
    models: Models, log_ratio: Callable[[torch.Tensor], torch.Tensor], device: torch.device
) -> torch.Tensor:
    """The DRS pilot on its own fixed stream, so a cached pilot equals a fresh one."""
    return drs.model_pilot(models, log_ratio, device)
