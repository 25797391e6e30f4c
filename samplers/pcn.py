"""Latent preconditioned Crank-Nicolson: exact MH in latent space.

Target pi(z) ~ N(z; 0, I) exp(l(G(z))): pushed through G, the latent chain samples
p_G(x) exp(l(x)), which is p(x) when exp(l) = p / p_G. The proposal
z' = sqrt(1 - beta^2) z + beta xi leaves N(0, I) invariant, so the prior cancels and the
log acceptance ratio is l(G(z')) - l(G(z)). beta = 1 is the independent sampler (IMH);
small beta moves locally and accepts more often.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from samplers._core import Info, Kernel, Noise, accept, per_row, where_rows
from samplers.spec import MethodSpec, Models, Option, need

Generator = Callable[[torch.Tensor], torch.Tensor]
LogRatio = Callable[[torch.Tensor], torch.Tensor]


class State(NamedTuple):
    z: torch.Tensor  # (B, latent_dim)
    x: torch.Tensor  # (B, *shape) G(z), cached
    logit: torch.Tensor  # (B,) l(G(z)), cached
    beta: torch.Tensor  # (B,) step in (0, 1]


@torch.inference_mode()
def init(
    generator: Generator,
    log_ratio: LogRatio,
    noise: Noise,
    latent_dim: int,
    beta: float | torch.Tensor,
) -> State:
    """Start each row at z ~ N(0, I)."""
    z = noise.normal(latent_dim)
    x = generator(z)
    return State(z, x, log_ratio(x).float(), per_row(beta, len(z), z.device))


def build(generator: Generator, log_ratio: LogRatio) -> Kernel:
    @torch.inference_mode()
    def step(state: State, noise: Noise) -> tuple[State, Info]:
        beta = state.beta[:, None]  # (B, 1)
        z_new = (1 - beta**2).sqrt() * state.z + beta * noise.normal(state.z.shape[1])
        x_new = generator(z_new)
        logit_new = log_ratio(x_new).float()
        info = accept(logit_new - state.logit, noise)
        moved = info.is_accepted
        z = where_rows(moved, z_new, state.z)
        logit = torch.where(moved, logit_new, state.logit)
        trace = -0.5 * (z**2).sum(-1) + logit  # log pi(z)
        return State(z, where_rows(moved, x_new, state.x), logit, state.beta), info._replace(
            trace=trace
        )

    return Kernel(step=step, output=output)


def output(state: State) -> torch.Tensor:
    return state.x


def start(
    models: Models, options: dict[str, Any], noise: Noise, steps: int | None, pilot: Any = None
) -> tuple[Kernel, State]:
    log_ratio = need(models, "log_ratio", "a discriminator D(x)", "pcn")
    state = init(models.generator, log_ratio, noise, models.latent_dim, options["beta"])
    return build(models.generator, log_ratio), state


METHOD = MethodSpec(
    name="pcn",
    summary="latent preconditioned Crank-Nicolson, exact MH",
    start=start,
    options=(
        Option("beta", float, 0.5, "step in (0, 1]; 1 is the independent sampler", gt=0, le=1),
    ),
    needs=("log_ratio",),
)
