"""Discriminator rejection sampling (DRS, Azadi et al.).

Each step draws a fresh proposal x = G(z) per row and accepts it with probability
sigmoid(F(x)), where

    F(x) = l(x) - l_max - log(1 - exp(l(x) - l_max - eps)) - gamma.

With gamma = 0 and eps -> 0, sigmoid(F) = exp(l(x) - l_max): exact rejection sampling
from p whenever exp(l) is the true ratio p / p_G and l_max its maximum. l_max starts at
the largest logit of a pilot of at least 10k proposals (`pilot`) and is kept as a running
maximum over every proposal a row sees. A positive gamma raises acceptance at the price
of exactness (`gamma_for_percentile` reproduces the paper's percentile rule).

DRS is not a chain: rows are i.i.d. trials. In `final` mode a row's output is its most
recent accepted proposal; a row with none after its steps gets one more round of steps
(`restart`), and one with none even then gives its latest proposal (`has_sample` False,
which callers report).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.nn import functional as F

from samplers._core import Info, Kernel, Noise, accept, per_row, where_rows
from samplers.proposals import IndependentProposal

LogRatio = Callable[[torch.Tensor], torch.Tensor]
PILOT_SIZE = 10_000


class State(NamedTuple):
    x: torch.Tensor  # (B, *shape) latest accepted sample (latest proposal until one is)
    has_sample: torch.Tensor  # (B,) bool
    log_max: torch.Tensor  # (B,) running maximum of l over the pilot and every proposal
    gamma: torch.Tensor  # (B,) acceptance shift; 0 is exact
    eps: torch.Tensor  # (B,) keeps log(1 - exp(.)) finite at the maximum


@torch.inference_mode()
def pilot(
    propose: IndependentProposal, log_ratio: LogRatio, noise: Noise, n: int = PILOT_SIZE
) -> torch.Tensor:
    """Logits of n pilot proposals drawn in batches of noise.batch_size, shape (n,)."""
    assert n >= 1 and noise.batch_size >= 1, "pilot needs proposals"
    logits = []
    for _ in range(math.ceil(n / noise.batch_size)):
        logits.append(log_ratio(propose(noise)).float())
    return torch.cat(logits)[:n]


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, accurate at both ends (Maechler's rule)."""
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def score(logit: torch.Tensor, log_max: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """F(x) before the gamma shift."""
    delta = logit - log_max  # <= 0 once log_max is updated
    return delta - log1mexp(delta - eps)


def gamma_for_percentile(pilot_logits: torch.Tensor, percentile: float, eps: float = 1e-6) -> float:
    """gamma as the given percentile (0..100) of F over the pilot (DRS's shift rule)."""
    assert 0.0 <= percentile <= 100.0, "percentile must lie in [0, 100]"
    log_max = pilot_logits.max()
    scores = score(pilot_logits, log_max, torch.tensor(eps))
    return float(torch.quantile(scores.double(), percentile / 100.0))


def init(
    sample_like: torch.Tensor,
    log_max: float | torch.Tensor,
    gamma: float | torch.Tensor = 0.0,
    eps: float | torch.Tensor = 1e-6,
) -> State:
    """Rows with no sample yet; `sample_like` (B, *shape) fixes shape, dtype, device."""
    rows, device = len(sample_like), sample_like.device
    return State(
        torch.zeros_like(sample_like),
        torch.zeros(rows, dtype=torch.bool, device=device),
        per_row(log_max, rows, device),
        per_row(gamma, rows, device),
        per_row(eps, rows, device),
    )


def build(propose: IndependentProposal, log_ratio: LogRatio) -> Kernel:
    @torch.inference_mode()
    def step(state: State, noise: Noise) -> tuple[State, Info]:
        x_new = propose(noise)
        logit = log_ratio(x_new).float()
        log_max = torch.maximum(state.log_max, torch.nan_to_num(logit, nan=-torch.inf))
        # Acceptance probability sigmoid(F) enters the MH helper as log sigmoid(F) <= 0.
        info = accept(F.logsigmoid(score(logit, log_max, state.eps) - state.gamma), noise)
        keep = info.is_accepted | ~state.has_sample
        return State(
            where_rows(keep, x_new, state.x),
            state.has_sample | info.is_accepted,
            log_max,
            state.gamma,
            state.eps,
        ), info

    return Kernel(step=step, output=output, restart=restart)


def output(state: State) -> torch.Tensor:
    return state.x


def restart(state: State) -> tuple[State, torch.Tensor]:
    """Rows without an accepted sample need another round of trials."""
    return state, ~state.has_sample
