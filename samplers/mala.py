"""Latent Metropolis-adjusted Langevin (DDLS, REP-GAN) with the exact MH correction.

Target log pi(z) = -|z|^2 / 2 + l(G(z)) (energy U = -log pi). Proposal
z' = z + eps * grad log pi(z) + sqrt(2 eps) xi, so q(z' | z) = N(z + eps grad, 2 eps I),
and the log acceptance ratio is

    log pi(z') - log pi(z) + log q(z | z') - log q(z' | z).

The gradient flows through D and G (torch.export programs included); everything else is
under inference mode. The state caches log pi and its gradient at z.

step_size "auto" (the default) adapts eps per chain during warm-up, the first half of
the request's steps (`samplers.adaptation`), and freezes it after; a number is a fixed
step with no warm-up. `langevin_step` is the one Langevin move: ex2mcmc uses it too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from samplers import adaptation
from samplers._core import Info, Kernel, Noise, accept, per_row, where_rows
from samplers.spec import AUTO, MethodSpec, Models, Option, need

Generator = Callable[[torch.Tensor], torch.Tensor]
LogRatio = Callable[[torch.Tensor], torch.Tensor]


class State(NamedTuple):
    z: torch.Tensor  # (B, latent_dim)
    x: torch.Tensor  # (B, *shape) G(z)
    log_target: torch.Tensor  # (B,) log pi(z)
    grad: torch.Tensor  # (B, latent_dim) grad log pi(z)
    step_size: torch.Tensor  # (B,) eps > 0
    warmup_left: torch.Tensor  # (B,) int64: adaptation steps still to come


def log_target_and_grad(
    generator: Generator, log_ratio: LogRatio, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G(z), log pi(z), grad log pi(z)), all detached."""
    with torch.inference_mode(False), torch.enable_grad():
        z = z.detach().clone().requires_grad_(True)  # a normal tensor even from inference
        x = generator(z)
        log_target = -0.5 * (z**2).sum(-1) + log_ratio(x).float()
        (grad,) = torch.autograd.grad(log_target.sum(), z)
    return x.detach(), log_target.detach(), grad.detach()


def init(
    generator: Generator,
    log_ratio: LogRatio,
    noise: Noise,
    latent_dim: int,
    step_size: float | torch.Tensor,
    warmup: int = 0,
) -> State:
    """Rows at z ~ N(0, I); `warmup` > 0 adapts step_size (its start) for that many steps."""
    z = noise.normal(latent_dim)
    x, log_target, grad = log_target_and_grad(generator, log_ratio, z)
    rows = len(z)
    warmup_left = torch.full((rows,), int(warmup), dtype=torch.long, device=z.device)
    return State(z, x, log_target, grad, per_row(step_size, rows, z.device), warmup_left)


def _log_q(to: torch.Tensor, frm: torch.Tensor, grad_frm: torch.Tensor, eps: torch.Tensor):
    """log q(to | frm) up to a constant shared by both directions, shape (B,)."""
    mean = frm + eps[:, None] * grad_frm
    return -((to - mean) ** 2).sum(-1) / (4 * eps)


def langevin_step(
    generator: Generator, log_ratio: LogRatio, state: Any, noise: Noise
) -> tuple[Any, Info]:
    """One MALA move of every row of `state` (any state with z, x, log_target, grad and
    step_size fields); returns the moved state and the step's Info (no warm-up, no trace)."""
    eps = state.step_size
    z, grad = state.z, state.grad
    xi = noise.normal(z.shape[1])
    z_new = z + eps[:, None] * grad + (2 * eps)[:, None].sqrt() * xi
    x_new, log_target_new, grad_new = log_target_and_grad(generator, log_ratio, z_new)
    log_ratio_mh = (
        log_target_new
        - state.log_target
        + _log_q(z, z_new, grad_new, eps)
        - _log_q(z_new, z, grad, eps)
    )
    info = accept(log_ratio_mh, noise)
    moved = info.is_accepted
    return state._replace(
        z=where_rows(moved, z_new, z),
        x=where_rows(moved, x_new, state.x),
        log_target=torch.where(moved, log_target_new, state.log_target),
        grad=where_rows(moved, grad_new, grad),
    ), info


def adaptive_langevin_step(
    generator: Generator, log_ratio: LogRatio, state: Any, noise: Noise, in_warmup: torch.Tensor
) -> tuple[Any, Info]:
    """`langevin_step`, then each warm-up row adapts its step size to the step's outcome."""
    state, info = langevin_step(generator, log_ratio, state, noise)
    step_size = adaptation.adapt(state.step_size, info.acceptance_probability, in_warmup)
    return state._replace(step_size=step_size), info


def build(generator: Generator, log_ratio: LogRatio) -> Kernel:
    def step(state: State, noise: Noise) -> tuple[State, Info]:
        in_warmup, warmup_left = adaptation.tick(state.warmup_left)
        state, info = adaptive_langevin_step(generator, log_ratio, state, noise, in_warmup)
        info = info._replace(in_warmup=in_warmup, trace=state.log_target)
        return state._replace(warmup_left=warmup_left), info

    return Kernel(step=step, output=output)


def output(state: State) -> torch.Tensor:
    return state.x


def start(
    models: Models, options: dict[str, Any], noise: Noise, steps: int | None, pilot: Any = None
) -> tuple[Kernel, State]:
    log_ratio = need(models, "log_ratio", "a discriminator D(x)", "mala")
    step_size, warmup = options["step_size"], 0
    if step_size == AUTO:
        step_size = adaptation.INITIAL_STEP_SIZE
        warmup = adaptation.warmup_steps(options["warmup"], steps)
    state = init(models.generator, log_ratio, noise, models.latent_dim, step_size, warmup)
    return build(models.generator, log_ratio), state


STEP_SIZE = Option(
    "step_size",
    float,
    AUTO,
    'Langevin step eps > 0, or "auto": adapted per chain during warm-up, then fixed',
    gt=0,
    le=10,
    auto=True,
)
WARMUP = Option(
    "warmup",
    int,
    AUTO,
    'steps that adapt the step size (not emitted); "auto": half the request\'s steps',
    ge=0,
    le=1_000_000,
    auto=True,
)

METHOD = MethodSpec(
    name="mala",
    summary="latent Metropolis-adjusted Langevin, exact MH correction",
    start=start,
    options=(STEP_SIZE, WARMUP),
    needs=("log_ratio",),
)
