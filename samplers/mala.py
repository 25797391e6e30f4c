"""Latent Metropolis-adjusted Langevin (DDLS, REP-GAN) with the exact MH correction.

Target log pi(z) = -|z|^2 / 2 + l(G(z)) (energy U = -log pi). Proposal
z' = z + eps * grad log pi(z) + sqrt(2 eps) xi, so q(z' | z) = N(z + eps grad, 2 eps I),
and the log acceptance ratio is

    log pi(z') - log pi(z) + log q(z | z') - log q(z' | z).

The gradient flows through D and G (torch.export programs included); everything else is
under inference mode. The state caches log pi and its gradient at z.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from samplers._core import Info, Kernel, Noise, accept, per_row, where_rows

Generator = Callable[[torch.Tensor], torch.Tensor]
LogRatio = Callable[[torch.Tensor], torch.Tensor]


class State(NamedTuple):
    z: torch.Tensor  # (B, latent_dim)
    x: torch.Tensor  # (B, *shape) G(z)
    log_target: torch.Tensor  # (B,) log pi(z)
    grad: torch.Tensor  # (B, latent_dim) grad log pi(z)
    step_size: torch.Tensor  # (B,) eps > 0


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
) -> State:
    z = noise.normal(latent_dim)
    x, log_target, grad = log_target_and_grad(generator, log_ratio, z)
    return State(z, x, log_target, grad, per_row(step_size, len(z), z.device))


def _log_q(to: torch.Tensor, frm: torch.Tensor, grad_frm: torch.Tensor, eps: torch.Tensor):
    """log q(to | frm) up to a constant shared by both directions, shape (B,)."""
    mean = frm + eps[:, None] * grad_frm
    return -((to - mean) ** 2).sum(-1) / (4 * eps)


def build(generator: Generator, log_ratio: LogRatio) -> Kernel:
    def step(state: State, noise: Noise) -> tuple[State, Info]:
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
        return State(
            where_rows(moved, z_new, z),
            where_rows(moved, x_new, state.x),
            torch.where(moved, log_target_new, state.log_target),
            where_rows(moved, grad_new, grad),
            eps,
        ), info

    return Kernel(step=step, output=output)


def output(state: State) -> torch.Tensor:
    return state.x
