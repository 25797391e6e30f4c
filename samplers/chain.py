"""Drivers that run a kernel for K steps: `run_final` and `run_stream`.

These serve tests, benchmarks and batch jobs; the online engine drives kernels row by
row itself but follows the same rules: one restart round for rows the kernel flags
(`Kernel.restart`); kernels with `Kernel.done` (drs) step each row until it is done,
whatever K; warm-up steps (`Info.in_warmup`) are never emitted.

Example:
    >>> kernel = imh.build(propose, log_ratio)
    >>> noise = Noise.seeded(0, rows=1024)
    >>> result = run_final(kernel, imh.init_generator(propose, log_ratio, noise), noise, 50)
    >>> result.samples.shape, result.acceptance_rate
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from samplers._core import Info, Kernel, Noise, noise_rows, put, take


class Result(NamedTuple):
    samples: torch.Tensor  # (B, *shape)
    proposals: int  # row-steps taken (each row's start is not one)
    accepted: int  # row-steps that moved (chains) or accepted (drs)
    restarted: int  # rows that needed the restart round
    fallback: int = 0  # drs rows that spent their budget: their output is no DRS sample
    has_sample: torch.Tensor | None = None  # (B,) bool: drs rows whose output is a sample

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposals, 1)


def _steps(kernel: Kernel, state: Any, noise: Noise, steps: int) -> tuple[Any, int, int]:
    proposals = accepted = 0
    for _ in range(steps):
        state, info = kernel.step(state, noise)
        proposals += len(info.is_accepted)
        accepted += int(info.is_accepted.sum())
    return state, proposals, accepted


def _until_done(kernel: Kernel, state: Any, noise: Noise) -> tuple[Any, int, int]:
    """Step the rows that are not done (only those draw noise) until none is left."""
    proposals = accepted = 0
    while bool((active := ~kernel.done(state)).any()):
        every = bool(active.all())
        part = state if every else take(state, active)
        part, info = kernel.step(part, noise if every else noise_rows(noise, active))
        state = part if every else put(state, active, part)
        proposals += len(info.is_accepted)
        accepted += int(info.is_accepted.sum())
    return state, proposals, accepted


def run_final(kernel: Kernel, state: Any, noise: Noise, steps: int) -> Result:
    """Run every row `steps` steps (a `done` kernel: until done) and return one sample
    per row."""
    assert steps >= 1, "steps must be at least 1"
    if kernel.done is not None:
        state, proposals, accepted = _until_done(kernel, state, noise)
        has_sample = getattr(state, "has_sample", None)
        fallback = int((~has_sample).sum()) if has_sample is not None else 0
        return Result(kernel.output(state), proposals, accepted, 0, fallback, has_sample)
    state, proposals, accepted = _steps(kernel, state, noise, steps)
    restarted = 0
    if kernel.restart is not None:
        state, rows = kernel.restart(state)
        restarted = int(rows.sum())
        if restarted:
            sub, more_proposals, more_accepted = _steps(
                kernel, take(state, rows), noise_rows(noise, rows), steps
            )
            state = put(state, rows, sub)
            proposals, accepted = proposals + more_proposals, accepted + more_accepted
    return Result(kernel.output(state), proposals, accepted, restarted)


def emitted(info: Info) -> torch.Tensor:
    """(B,) rows whose new state a stream emits: accepted, and not a warm-up step."""
    if info.in_warmup is None:
        return info.is_accepted
    return info.is_accepted & ~info.in_warmup


def run_stream(
    kernel: Kernel, state: Any, noise: Noise, steps: int, thin: int = 1
) -> Iterator[tuple[torch.Tensor, Info]]:
    """Yield (newly accepted samples, info) after every `thin`-th step.

    Only accepted proposals are emitted, so a real starting point never is, and never
    a warm-up step's state.
    """
    assert steps >= 1 and thin >= 1, "steps and thin must be at least 1"
    for index in range(steps):
        state, info = kernel.step(state, noise)
        if (index + 1) % thin == 0:
            yield kernel.output(state)[emitted(info)], info
