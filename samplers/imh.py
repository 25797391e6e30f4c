"""Independent implicit Metropolis-Hastings (MH-GAN).

Propose x' = G(z') independently of the current state and accept with probability
min(1, exp(l(x') - l(x))), where exp(l) estimates p / p_G. With the exact log ratio the
chain's stationary law is p.

Chains start at held-out real samples (`init_real`, MH-GAN's choice: no burn-in) or at
a generator sample (`init_generator`). A real starting point is never returned: a chain
that has not accepted a single proposal when its steps run out restarts from its first
proposal (`restart`), and `output` falls back to that proposal too.

Example:
    >>> kernel = build(propose, log_ratio)
    >>> state = init_generator(propose, log_ratio, Noise.seeded(0, rows=64))
    >>> for _ in range(20):
    ...     state, info = kernel.step(state, noise)
    >>> samples = kernel.output(state)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from samplers import proposals
from samplers._core import Info, Kernel, Noise, accept, restart_from_first, where_rows
from samplers.proposals import IndependentProposal
from samplers.spec import MethodSpec, Models, Option, need, real_rows, starts_real

LogRatio = Callable[[torch.Tensor], torch.Tensor]


class State(NamedTuple):
    x: torch.Tensor  # (B, *shape) current sample
    logit: torch.Tensor  # (B,) l(x), cached
    is_real: torch.Tensor  # (B,) bool: still at the real starting point
    first_x: torch.Tensor  # (B, *shape) first proposal, the restart point of a real start
    first_logit: torch.Tensor  # (B,)
    has_first: torch.Tensor  # (B,) bool: first_x holds a proposal


@torch.inference_mode()
def init_real(x_real: torch.Tensor, log_ratio: LogRatio) -> State:
    """Start each row at a held-out real sample (the first proposal fills in later)."""
    logit = log_ratio(x_real).float()
    is_real = torch.ones(len(x_real), dtype=torch.bool, device=x_real.device)
    return State(
        x_real, logit, is_real, torch.zeros_like(x_real), torch.zeros_like(logit), ~is_real
    )


@torch.inference_mode()
def init_generator(propose: IndependentProposal, log_ratio: LogRatio, noise: Noise) -> State:
    """Start each row at a fresh generator sample."""
    x = propose(noise)
    logit = log_ratio(x).float()
    is_real = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    return State(x, logit, is_real, x, logit, ~is_real)


def build(propose: IndependentProposal, log_ratio: LogRatio, trace: bool = True) -> Kernel:
    """`trace`: report each chain's logit l(x) for diagnostics (False: no score to trace,
    as for the raw generator)."""

    @torch.inference_mode()
    def step(state: State, noise: Noise) -> tuple[State, Info]:
        x_new = propose(noise)
        logit_new = log_ratio(x_new).float()
        info = accept(logit_new - state.logit, noise)
        moved = info.is_accepted
        x = where_rows(moved, x_new, state.x)
        logit = torch.where(moved, logit_new, state.logit)
        if trace:
            info = info._replace(trace=logit)
        if bool(state.has_first.all()):  # generator starts, or after the first step
            return State(x, logit, state.is_real & ~moved, *state[3:]), info
        # The first proposal of a real-started chain is kept as its restart point.
        first = ~state.has_first
        return State(
            x,
            logit,
            state.is_real & ~moved,
            where_rows(first, x_new, state.first_x),
            torch.where(first, logit_new, state.first_logit),
            torch.ones_like(state.has_first),
        ), info

    return Kernel(step=step, output=output, restart=restart)


def output(state: State) -> torch.Tensor:
    """Current samples; rows still at their real start give their first proposal."""
    return where_rows(state.is_real, state.first_x, state.x)


def restart(state: State) -> tuple[State, torch.Tensor]:
    """Rows that never moved continue from their first proposal (MH-GAN's restart)."""
    return restart_from_first(state, {"x": "first_x", "logit": "first_logit"})


def start(
    models: Models, options: dict[str, Any], noise: Noise, steps: int | None, pilot: Any = None
) -> tuple[Kernel, State]:
    log_ratio = need(models, "log_ratio", "a discriminator D(x)", "imh")
    propose = proposals.independent(models.generator, models.latent_dim)
    kernel = build(propose, log_ratio)
    if starts_real(models, options["init"]):
        return kernel, init_real(real_rows(models, noise), log_ratio)
    return kernel, init_generator(propose, log_ratio, noise)


def start_raw(
    models: Models, options: dict[str, Any], noise: Noise, steps: int | None, pilot: Any = None
) -> tuple[Kernel, State]:
    """The raw generator: an independent sampler whose every proposal is accepted."""
    propose = proposals.independent(models.generator, models.latent_dim)
    kernel = build(propose, _zero_log_ratio, trace=False)
    return kernel, init_generator(propose, _zero_log_ratio, noise)


def _zero_log_ratio(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(x), device=x.device)


INIT = Option(
    "init",
    str,
    "real",
    "chain start: held-out real samples (MH-GAN; generator samples if the model ships "
    "none) or generator samples",
    choices=("real", "generator"),
)

METHOD = MethodSpec(
    name="imh",
    summary="independent implicit Metropolis-Hastings (MH-GAN)",
    start=start,
    options=(INIT,),
    needs=("log_ratio",),
)
RAW = MethodSpec(name="none", summary="raw generator samples, no filtering", start=start_raw)
