"""Ex2MCMC: a global i-SIR move, then a few local MALA moves, every iteration.

Samsonov et al., "Local-Global MCMC kernels: the best of both worlds" (NeurIPS 2022).
Same latent target as `isir` and `mala`: pi(z) ~ N(z; 0, I) exp(l(G(z))). The i-SIR
step (`isir.isir_move`) jumps between modes, which Langevin steps alone cross slowly;
the MALA steps (`mala.langevin_step`) then refine the picked point locally, where fresh
global proposals rarely land. Each move leaves pi invariant, so their composition does.

The MALA step size is per chain, adapted during warm-up only (`samplers.adaptation`,
target acceptance 0.574, warm-up: the first half of the request's steps), then frozen:
after warm-up every iteration applies one fixed kernel, an exact MH chain.

An iteration evaluates N - 1 particles (forward only) and mala_steps Langevin proposals
(forward and backward), plus one forward-backward at the picked particle of the rows
that moved (its gradient starts the first Langevin step). `Info.is_accepted` marks rows
whose state changed in the iteration (the i-SIR move or any MALA step), `log_ratio` is
the i-SIR move's log P(move), `trace` the log target after the iteration.

Defaults: particles 8, mala_steps 3 (the paper's), step_size "auto". docs/RESULTS.md has
the quality these give on the built-in models, against isir alone and mala alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from samplers import adaptation, isir, mala
from samplers._core import Info, Kernel, Noise, noise_rows, per_row, put, take
from samplers.spec import AUTO, MethodSpec, Models, Option, need

Generator = Callable[[torch.Tensor], torch.Tensor]
LogRatio = Callable[[torch.Tensor], torch.Tensor]
MALA_STEPS = 3


class State(NamedTuple):
    z: torch.Tensor  # (B, latent_dim)
    x: torch.Tensor  # (B, *shape) G(z)
    log_target: torch.Tensor  # (B,) log pi(z)
    grad: torch.Tensor  # (B, latent_dim) grad log pi(z)
    step_size: torch.Tensor  # (B,) MALA eps > 0
    warmup_left: torch.Tensor  # (B,) int64: adaptation iterations still to come
    particles: torch.Tensor  # (B,) int64 i-SIR particles, the current state included
    scale: torch.Tensor  # (B,) i-SIR proposal N(0, s^2 I)
    mala_steps: torch.Tensor  # (B,) int64 MALA steps per iteration


def init(
    generator: Generator,
    log_ratio: LogRatio,
    noise: Noise,
    latent_dim: int,
    particles: int = isir.PARTICLES,
    scale: float = 1.0,
    mala_steps: int = MALA_STEPS,
    step_size: float = adaptation.INITIAL_STEP_SIZE,
    warmup: int = 0,
) -> State:
    """Rows at z ~ N(0, I); `warmup` > 0 adapts step_size (its start) for that many
    iterations."""
    z = noise.normal(latent_dim)
    x, log_target, grad = mala.log_target_and_grad(generator, log_ratio, z)
    rows, device = len(z), z.device

    def count(value: int) -> torch.Tensor:
        return torch.full((rows,), int(value), dtype=torch.long, device=device)

    return State(
        z,
        x,
        log_target,
        grad,
        per_row(step_size, rows, device),
        count(warmup),
        count(particles),
        per_row(scale, rows, device),
        count(mala_steps),
    )


def build(generator: Generator, log_ratio: LogRatio) -> Kernel:
    def step(state: State, noise: Noise) -> tuple[State, Info]:
        in_warmup, warmup_left = adaptation.tick(state.warmup_left)
        state, global_info = isir.isir_move(generator, log_ratio, state, noise)
        state = _refresh_gradient(generator, log_ratio, state, global_info.is_accepted)
        changed = global_info.is_accepted.clone()
        for index in range(int(state.mala_steps.max())):
            rows = state.mala_steps > index
            every = bool(rows.all())
            part = state if every else take(state, rows)
            part_noise = noise if every else noise_rows(noise, rows)
            part, info = mala.adaptive_langevin_step(
                generator, log_ratio, part, part_noise, in_warmup if every else in_warmup[rows]
            )
            state = part if every else put(state, rows, part)
            changed[rows] |= info.is_accepted
        info = Info(changed, global_info.log_ratio, in_warmup, state.log_target)
        return state._replace(warmup_left=warmup_left), info

    return Kernel(step=step, output=output)


def _refresh_gradient(generator, log_ratio, state: State, moved: torch.Tensor) -> State:
    """Rows that jumped need grad log pi at their new point (i-SIR evaluates no gradient)."""
    if not bool(moved.any()):
        return state
    # The pass returns log pi too; the chain keeps the i-SIR value its weights used.
    _, _, grad = mala.log_target_and_grad(generator, log_ratio, state.z[moved])
    return state._replace(grad=state.grad.index_put((moved,), grad))


def output(state: State) -> torch.Tensor:
    return state.x


def start(
    models: Models, options: dict[str, Any], noise: Noise, steps: int | None, pilot: Any = None
) -> tuple[Kernel, State]:
    log_ratio = need(models, "log_ratio", "a discriminator D(x)", "ex2mcmc")
    step_size, warmup = options["step_size"], 0
    if step_size == AUTO:
        step_size = adaptation.INITIAL_STEP_SIZE
        warmup = adaptation.warmup_steps(options["warmup"], steps)
    state = init(
        models.generator,
        log_ratio,
        noise,
        models.latent_dim,
        options["particles"],
        options["scale"],
        options["mala_steps"],
        step_size,
        warmup,
    )
    return build(models.generator, log_ratio), state


METHOD = MethodSpec(
    name="ex2mcmc",
    summary="Ex2MCMC: a global i-SIR move and a few local MALA moves per iteration",
    start=start,
    options=(
        isir.PARTICLES_OPTION,
        isir.SCALE_OPTION,
        Option("mala_steps", int, MALA_STEPS, "MALA steps after each i-SIR step", ge=1, le=100),
        mala.STEP_SIZE,
        mala.WARMUP,
    ),
    needs=("log_ratio",),
    proposals_per_step=lambda options: options["particles"] - 1 + options["mala_steps"],
)
