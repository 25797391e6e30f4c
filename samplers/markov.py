"""Implicit Metropolis-Hastings with a Markov proposal (Neklyudov et al.).

Propose x ~ q(x | y) around the current state y and accept with probability
min(1, d(x, y) / d(y, x)), where the pair discriminator d in [b, 1] is trained with the
implicit-MH bound so that d(x, y) / d(y, x) estimates p(x) q(y | x) / (p(y) q(x | y)).
The independent case is d(x, y) = D(x)(1 - D(y)).

`log_pair(x, y)` returns log d(x, y) per row. Proposals: `proposals.gaussian_perturbation`
(data space, per-row scale) or `proposals.conditional` (a learned q(x | y)). Real starts
follow the same never-return-a-real-point rule as `imh`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from samplers import proposals
from samplers._core import (
    Info,
    Kernel,
    Noise,
    accept,
    per_row,
    restart_from_first,
    where_rows,
)
from samplers.imh import INIT
from samplers.proposals import IndependentProposal, MarkovProposal
from samplers.spec import MethodSpec, Models, Option, need, real_rows, starts_real

LogPair = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class State(NamedTuple):
    x: torch.Tensor  # (B, *shape) current sample
    is_real: torch.Tensor  # (B,) bool: still at the real starting point
    first_x: torch.Tensor  # (B, *shape) first proposal (restart point of a real start)
    has_first: torch.Tensor  # (B,) bool
    scale: torch.Tensor  # (B,) proposal scale (used by the Gaussian perturbation)


def init_real(x_real: torch.Tensor, scale: float | torch.Tensor = 0.0) -> State:
    is_real = torch.ones(len(x_real), dtype=torch.bool, device=x_real.device)
    scale = per_row(scale, len(x_real), x_real.device)
    return State(x_real, is_real, torch.zeros_like(x_real), ~is_real, scale)


@torch.inference_mode()
def init_generator(
    propose: IndependentProposal, noise: Noise, scale: float | torch.Tensor = 0.0
) -> State:
    x = propose(noise)
    is_real = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    return State(x, is_real, x, ~is_real, per_row(scale, len(x), x.device))


def build(propose: MarkovProposal, log_pair: LogPair) -> Kernel:
    @torch.inference_mode()
    def step(state: State, noise: Noise) -> tuple[State, Info]:
        y = state.x
        x = propose(y, noise, state.scale)
        # One pass over [(x, y); (y, x)] evaluates both directions of the ratio.
        both = log_pair(torch.cat([x, y]), torch.cat([y, x])).float()  # (2B,)
        log_d_xy, log_d_yx = both.chunk(2)
        info = accept(log_d_xy - log_d_yx, noise)
        first, moved = ~state.has_first, info.is_accepted
        return State(
            where_rows(moved, x, y),
            state.is_real & ~moved,
            where_rows(first, x, state.first_x),
            torch.ones_like(state.has_first),
            state.scale,
        ), info

    return Kernel(step=step, output=output, restart=restart)


def output(state: State) -> torch.Tensor:
    return where_rows(state.is_real, state.first_x, state.x)


def restart(state: State) -> tuple[State, torch.Tensor]:
    """Rows that never moved continue from their first proposal, as in `imh`."""
    return restart_from_first(state, {"x": "first_x"})


def independent_pair(log_ratio: Callable[[torch.Tensor], torch.Tensor]) -> LogPair:
    """d(x, y) = D(x)(1 - D(y)) from a sample discriminator's logit l = logit D."""
    logsigmoid = torch.nn.functional.logsigmoid

    def log_pair(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return logsigmoid(log_ratio(x)) + logsigmoid(-log_ratio(y))

    return log_pair


def start(
    models: Models, options: dict[str, Any], noise: Noise, steps: int | None, pilot: Any = None
) -> tuple[Kernel, State]:
    """`options["proposal"]` is the service's business: it picks models.markov_proposal."""
    log_pair = need(models, "log_pair", "a pair discriminator d(x, y)", "markov")
    move = models.markov_proposal or proposals.gaussian_perturbation
    kernel = build(move, log_pair)
    if starts_real(models, options["init"]):
        return kernel, init_real(real_rows(models, noise), options["scale"])
    start_proposal = proposals.independent(models.generator, models.latent_dim)
    return kernel, init_generator(start_proposal, noise, options["scale"])


METHOD = MethodSpec(
    name="markov",
    summary="implicit MH with a Markov proposal and a pair discriminator d(x, y)",
    start=start,
    options=(
        INIT,
        Option(
            "proposal",
            str,
            None,
            "default: what the pair discriminator was trained for",
            choices=("gaussian", "conditional", "independent"),
            nullable=True,
        ),
        Option("scale", float, 0.1, "Gaussian proposal scale in data space", gt=0, le=1e3),
    ),
    needs=("log_pair",),
)
