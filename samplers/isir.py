"""Iterated sampling-importance-resampling (i-SIR) in latent space.

Samsonov et al., "Local-Global MCMC kernels: the best of both worlds" (NeurIPS 2022).
Target pi(z) ~ N(z; 0, I) exp(l(G(z))), l the calibrated discriminator logit: pushed
through G, the chain samples p_G(x) exp(l(x)), which is p(x) when exp(l) = p / p_G.

One step per row: particle 0 is the current state, particles 1..N-1 are fresh draws from
q = N(0, s^2 I); every particle gets the weight w_i = pi(z_i) / q(z_i), and the row
moves to particle i with probability w_i / sum_j w_j (one uniform of the row's own
stream, inverted through the cumulative weights). Keeping the current state among the
particles is what makes this an exact MCMC kernel for pi at any N (plain SIR is exact
only as N -> infinity), and the weights need log q for the same reason.

Cost: the N - 1 new particles of all B rows go through G and D as one batch of
B x (N - 1) rows; the current state's log pi is cached, never evaluated again.
`Info.is_accepted` marks rows that moved (picked a particle other than 0) and
`Info.log_ratio` is log P(move) = log(1 - w_0 / sum w).

Defaults: particles N = 8, scale s = 1 (q is the latent prior, so w_i = exp(l(G(z_i)))
for the new particles). With 8 particles about half the steps move on toy25 (0.45 to
0.61 over K = 100 to 10) and 0.61 on digits, where IMH accepts 0.22 and 0.25 of its
proposals; 7 proposals per step keep a step affordable. Measured on the built-in models
(docs/RESULTS.md): toy25 quality saturates from N = 4 (HQ 0.987-0.989 for N = 4, 8, 16),
more particles only buy mode balance at a higher price per sample (JSD 0.018 at 120
proposals per sample with N = 4, 0.017 at 140 with N = 8, 0.016 at 300 with N = 16);
on digits N = 16 gave a worse FID than N = 8 (21.9 against 20.0 at K = 50, three seeds)
because the chains get closer to the discriminator's target, which is itself worse than
the partly converged chains there (see docs/RESULTS.md). A NaN score weighs nothing:
that particle is never picked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from samplers._core import Info, Kernel, Noise, per_row, where_rows
from samplers.spec import MethodSpec, Models, Option, need

Generator = Callable[[torch.Tensor], torch.Tensor]
LogRatio = Callable[[torch.Tensor], torch.Tensor]
PARTICLES = 8


class State(NamedTuple):
    z: torch.Tensor  # (B, latent_dim)
    x: torch.Tensor  # (B, *shape) G(z), cached
    log_target: torch.Tensor  # (B,) log pi(z), cached
    particles: torch.Tensor  # (B,) int64 N >= 2, the current state included
    scale: torch.Tensor  # (B,) s > 0 of the proposal N(0, s^2 I)


def log_prior(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z**2).sum(-1)


def log_proposal(z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, s^2 I) up to the constant shared by every particle; z (..., d)."""
    return -0.5 * (z**2).sum(-1) / scale**2 - z.shape[-1] * scale.log()


@torch.inference_mode()
def init(
    generator: Generator,
    log_ratio: LogRatio,
    noise: Noise,
    latent_dim: int,
    particles: int | torch.Tensor = PARTICLES,
    scale: float | torch.Tensor = 1.0,
) -> State:
    """Start each row at z ~ N(0, I)."""
    z = noise.normal(latent_dim)
    x = generator(z)
    rows = len(z)
    count = torch.as_tensor(particles, device=z.device).long().expand(rows).clone()
    return State(z, x, log_prior(z) + log_ratio(x).float(), count, per_row(scale, rows, z.device))


@torch.inference_mode()
def isir_move(generator: Generator, log_ratio: LogRatio, state: Any, noise: Noise):
    """One i-SIR step of every row of `state` (any state with the fields of `State`);
    returns the moved state and the step's Info (no warm-up, no trace)."""
    z_grid, valid = _fresh_particles(state, noise)
    z_new = z_grid.reshape(-1, z_grid.shape[2]) if valid is None else z_grid[valid]
    if len(z_new) == 0:  # every row has one particle: nothing to move to
        stay = torch.zeros(len(state.z), dtype=torch.bool, device=state.z.device)
        return state, Info(stay, torch.full_like(state.log_target, -torch.inf))
    x_new = generator(z_new)  # the B x (N - 1) new particles in one batch
    log_target_new = log_prior(z_new) + log_ratio(x_new).float()
    if valid is None:
        target_grid = log_target_new.view(z_grid.shape[:2])
    else:
        target_grid = torch.full(valid.shape, -torch.inf, device=valid.device)
        target_grid[valid] = log_target_new
    # Particle 0 is the current state; every weight is log pi - log q, in one pass.
    z_all = torch.cat([state.z[:, None], z_grid], 1)  # (B, K + 1, d)
    log_target_all = torch.cat([state.log_target[:, None], target_grid], 1)
    log_weights = log_target_all - log_proposal(z_all, state.scale[:, None])
    # NaN weighs nothing; +inf becomes the largest float, so it is picked (IMH moves to it).
    log_weights = log_weights.nan_to_num(nan=-torch.inf)
    pick, log_move = _categorical(log_weights, noise)
    moved = pick > 0
    chosen = _flat_index(pick, valid, z_grid.shape[1])
    return state._replace(
        z=where_rows(moved, z_new[chosen], state.z),
        x=where_rows(moved, x_new[chosen], state.x),
        log_target=torch.where(moved, log_target_new[chosen], state.log_target),
    ), Info(moved, log_move)


def _fresh_particles(state: Any, noise: Noise) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, K, d) draws from q, K the most any row needs, and the (B, K) mask of real ones
    (None when every row has the same count, the usual case: nothing to mask)."""
    rows, dim = state.z.shape
    fresh = state.particles - 1
    width = int(fresh.max()) if rows else 0
    if rows == 0 or int(fresh.min()) == width:
        return state.scale[:, None, None] * noise.normal(width, dim), None
    draws = noise.normal_per_row(fresh, dim)
    valid = torch.arange(width, device=draws.device) < fresh[:, None].to(draws.device)
    return state.scale[:, None, None] * draws, valid


def _flat_index(pick: torch.Tensor, valid: torch.Tensor | None, width: int) -> torch.Tensor:
    """Where each row's picked new particle (pick >= 1) sits in the flat batch."""
    column = (pick - 1).clamp(min=0)
    if valid is None:
        return torch.arange(len(pick), device=pick.device) * width + column
    flat = torch.zeros(valid.shape, dtype=torch.long, device=valid.device)
    flat[valid] = torch.arange(int(valid.sum()), device=valid.device)
    return flat.gather(1, column[:, None]).squeeze(1)


def _categorical(log_weights: torch.Tensor, noise: Noise) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, index i with probability w_i / sum w, and log(1 - w_0 / sum w).

    A row whose weights are all zero (every score NaN or -inf) stays at index 0 (its
    log move probability is NaN, which counts as a rejection). No weight is NaN or +inf.
    """
    top = log_weights.max(1, keepdim=True).values.clamp(min=torch.finfo(log_weights.dtype).min)
    weights = (log_weights - top).exp()
    cumulative = weights.cumsum(1)
    total = cumulative[:, -1]
    pick = (cumulative <= (noise.uniform() * total)[:, None]).sum(1)
    pick = pick.clamp(max=weights.shape[1] - 1).masked_fill(total == 0, 0)
    return pick, torch.log1p(-weights[:, 0] / total)


def build(generator: Generator, log_ratio: LogRatio) -> Kernel:
    def step(state: State, noise: Noise) -> tuple[State, Info]:
        state, info = isir_move(generator, log_ratio, state, noise)
        return state, info._replace(trace=state.log_target)

    return Kernel(step=step, output=output)


def output(state: State) -> torch.Tensor:
    return state.x


def start(
    models: Models, options: dict[str, Any], noise: Noise, steps: int | None, pilot: Any = None
) -> tuple[Kernel, State]:
    log_ratio = need(models, "log_ratio", "a discriminator D(x)", "isir")
    state = init(
        models.generator,
        log_ratio,
        noise,
        models.latent_dim,
        options["particles"],
        options["scale"],
    )
    return build(models.generator, log_ratio), state


PARTICLES_OPTION = Option(
    "particles",
    int,
    PARTICLES,
    "particles per step, the current state included (N - 1 fresh proposals)",
    ge=2,
    le=4096,
)
SCALE_OPTION = Option(
    "scale", float, 1.0, "proposal N(0, s^2 I) in latent space; 1 is the prior", gt=0, le=100
)

METHOD = MethodSpec(
    name="isir",
    summary="iterated sampling-importance-resampling in latent space (exact MCMC)",
    start=start,
    options=(PARTICLES_OPTION, SCALE_OPTION),
    needs=("log_ratio",),
    proposals_per_step=lambda options: options["particles"] - 1,
)
