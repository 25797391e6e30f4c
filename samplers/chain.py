"""Drivers that run a kernel for K steps: `run_final` and `run_stream`.

These serve tests, benchmarks and batch jobs; the online engine drives kernels row by
row itself but follows the same rules (one restart round for rows the kernel flags).

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

from samplers._core import Info, Kernel, Noise, noise_rows, take


class Result(NamedTuple):
    samples: torch.Tensor  # (B, *shape)
    proposals: int
    accepted: int
    restarted: int  # rows that needed the restart round

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


def run_final(kernel: Kernel, state: Any, noise: Noise, steps: int) -> Result:
    """Run every row `steps` steps and return one sample per row."""
    assert steps >= 1, "steps must be at least 1"
    state, proposals, accepted = _steps(kernel, state, noise, steps)
    restarted = 0
    if kernel.restart is not None:
        state, rows = kernel.restart(state)
        restarted = int(rows.sum())
        if restarted:
            sub, more_proposals, more_accepted = _steps(
                kernel, take(state, rows), noise_rows(noise, rows), steps
            )
            index = rows.nonzero().squeeze(1)
            state = type(state)(
                *(field.index_copy(0, index, part) for field, part in zip(state, sub, strict=True))
            )
            proposals, accepted = proposals + more_proposals, accepted + more_accepted
    return Result(kernel.output(state), proposals, accepted, restarted)


def run_stream(
    kernel: Kernel, state: Any, noise: Noise, steps: int, thin: int = 1
) -> Iterator[tuple[torch.Tensor, Info]]:
    """Yield (newly accepted samples, info) after every `thin`-th step.

    Only accepted proposals are emitted, so a real starting point never is.
    """
    assert steps >= 1 and thin >= 1, "steps and thin must be at least 1"
    for index in range(steps):
        state, info = kernel.step(state, noise)
        if (index + 1) % thin == 0:
            yield kernel.output(state)[info.is_accepted], info
