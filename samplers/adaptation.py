"""Step-size adaptation during warm-up, shared by mala and ex2mcmc.

Each chain adapts its own Langevin step size eps after every MALA step of its warm-up:

    log eps <- log eps + RATE * (a - TARGET_ACCEPTANCE),

a = min(1, exp(log MH ratio)) the step's acceptance probability (its expectation given
the proposal, a less noisy signal than the accept bit). The paper's rule (Samsonov et
al. 2022, Ex2MCMC) multiplies or divides eps by 1.05 by whether the batch's acceptance
is above or below 0.67; the proportional form above reaches the same fixed point per
chain (mean acceptance = target) and moves further when the chain is far off, which
matters in the service's short warm-ups (10 steps at its default of 20).

TARGET_ACCEPTANCE = 0.574 is the optimal MALA acceptance of Roberts & Rosenthal (1998)
for high-dimensional targets; the paper's 0.67 gave the same quality on toy25 (MALA,
K = 20: HQ 0.987 and 0.988, JSD 0.105 and 0.107; Ex2MCMC: HQ 0.989 both). RATE = 1.0: a
rejected step (a = 0) shrinks eps by e^-0.574 = 0.56, a certain acceptance grows it by
e^0.426 = 1.53, so a chain corrects a step 10x off in about five steps. That matters:
the adapted steps span four decades (median eps after warm-up: toy25 0.0068 for MALA
and 0.0006 for Ex2MCMC, whose i-SIR moves land chains in the sharp centres of modes;
digits 0.23; the 10th to 90th percentiles over chains span 100x on toy25). A rate of 0.1
(closer to the paper's 1.05 factor) left toy25 MALA at K = 20 with HQ 0.907 instead of
0.987: ten warm-up steps were too few to get there.

After warm-up eps is frozen (`warmup_left` reaches 0), so the rest of the chain is an
exact MH chain with a fixed kernel; the warm-up steps are flagged (`Info.in_warmup`) and
never emitted nor traced.
"""

from __future__ import annotations

import torch

from samplers.spec import AUTO

TARGET_ACCEPTANCE = 0.574
RATE = 1.0
INITIAL_STEP_SIZE = 0.01  # where "auto" starts: a small step (most accept) grows fast
WARMUP_WITHOUT_STEPS = 10  # "auto" warm-up when the caller does not say how many steps
MIN_STEP, MAX_STEP = 1e-8, 10.0


def warmup_steps(option: int | str, steps: int | None) -> int:
    """The warm-up length: the option, or for "auto" half the request's steps."""
    if option != AUTO:
        return int(option)
    return steps // 2 if steps is not None else WARMUP_WITHOUT_STEPS


def adapt(
    step_size: torch.Tensor, acceptance: torch.Tensor, in_warmup: torch.Tensor
) -> torch.Tensor:
    """The step sizes after one MALA step: adapted in warm-up rows, unchanged elsewhere."""
    update = RATE * (acceptance.nan_to_num(nan=0.0) - TARGET_ACCEPTANCE)
    adapted = (step_size.log() + update).exp().clamp(MIN_STEP, MAX_STEP)
    return torch.where(in_warmup, adapted, step_size)


def tick(warmup_left: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows whose current step is a warm-up step, warm-up steps left after it)."""
    in_warmup = warmup_left > 0
    return in_warmup, (warmup_left - 1).clamp(min=0)
