"""Filtering a finite, already-scored candidate set with independent MH chains or DRS.

A batch filter job holds candidates x_1..x_N drawn i.i.d. from the generator p_G and a
calibrated logit l_i = log p(x_i) / p_G(x_i) for each. Nothing new is proposed: the set,
in order, is the proposal stream, and the result says which candidates survive.

`mh_filter` (MH-GAN): consecutive blocks of `chain_length` candidates are independent
chains. A chain starts at its block's first usable candidate (below) and moves to a
later candidate j when

    U_j < exp(l_j - l_state),    tested as log U_j < l_j - l_state

(`_core.accept`'s rule in log space: +inf accepts, NaN rejects). With the exact ratio a
chain's last state approaches p geometrically, at rate 1 - 1/M per proposal where
M = max p / p_G; MH-GAN returns one last state per chain.

`drs_filter` (Azadi et al.): candidate i is accepted on its own with probability
sigmoid(F_i),

    F_i = l_i - l_max - log(1 - exp(l_i - l_max - eps)) - gamma,

l_max the set's own maximum. With gamma = 0 and eps -> 0, sigmoid(F_i) = exp(l_i - l_max):
rejection sampling from p with the set's maximum as the bound. A positive gamma accepts
less, a negative one more; either way the accepted law is no longer p.

U_i is the i-th float64 draw of a torch generator seeded with `seed`, so a result is a
pure function of (log_ratio, parameters, seed).

`accepted` marks only candidates a chain moved to under the MH test (or that DRS
accepted): never a chain's start, which was not filtered. Acceptance rate, everywhere:
accepted / proposals, where a proposal is a candidate after its chain's start (DRS:
every candidate).

Non-finite logits: NaN counts as -inf (a zero ratio). Neither is ever accepted, and
neither starts a chain: a chain starts at the first candidate of its block with a
logit above -inf, and the candidates before it are skipped (no proposals; `state` -1).
A block with no such candidate has no chain (`final` -1, `moved` False). +inf (an
infinite ratio): an MH chain moves to it from any other value and stays there to the end
of its block; DRS refuses it (ValueError), its bound being infinite.

Example:
    >>> result = mh_filter(log_ratio, chain_length=100, seed=0)
    >>> samples = candidates[result.final]  # one per chain
    >>> kept = candidates[drs_filter(log_ratio, seed=0).final]
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

from samplers import drs
from samplers._core import make_generator

# Below this many chains, a plain loop over candidates beats stepping all chains per
# position (numpy's per-call cost dominates narrow columns; one chain over 10^6 candidates).
FEW_CHAINS = 16


class FilterResult(NamedTuple):
    accepted: np.ndarray  # (N,) bool: the chain moved to candidate i / DRS accepted it
    state: np.ndarray  # (N,) int64: MH: chain state after i (-1 before its start); DRS: i or -1
    final: np.ndarray  # (C,) int64: MH: each chain's last state (-1: no chain); DRS: accepted
    acceptance_rate: float  # accepted / proposals; a chain's start is not a proposal
    moved: np.ndarray | None = None  # (C,) bool: MH: the chain left its start; DRS: all True
    proposals: int = 0  # MH: candidates after their chain's start; DRS: every candidate


def mh_filter(log_ratio: np.ndarray | torch.Tensor, chain_length: int, seed: int) -> FilterResult:
    """Independent MH chains over consecutive blocks of `chain_length` candidates.

    The last block may be shorter; chain_length >= N is one chain over the whole set.
    A chain that never moves ends at its start (`moved` False: its final state is an
    unfiltered candidate). acceptance_rate is NaN when there are no proposals.
    """
    logits = _as_logits(log_ratio)
    if not _is_int(chain_length) or chain_length < 1:
        raise ValueError(f"chain_length must be an integer >= 1, got {chain_length!r}")
    n = len(logits)
    length = min(int(chain_length), n)
    chains = -(-n // length)
    logits = np.where(np.isnan(logits), -np.inf, logits)
    log_u = _log_uniforms(seed, n).numpy()
    with np.errstate(invalid="ignore"):  # inf - inf is NaN, and NaN rejects
        if chains < FEW_CHAINS:
            accepted, starts = _walk(logits, log_u, length)
        else:
            accepted, starts = _step_columns(logits, log_u, length, chains)
    position = np.arange(n, dtype=np.int64)
    marks = _blocks(np.where(accepted | starts, position, -1), length, chains)
    state = np.maximum.accumulate(marks, axis=1).reshape(-1)[:n]  # never crosses a block
    last = np.minimum(np.arange(1, chains + 1) * length, n) - 1
    block_end = np.minimum(position[starts] // length * length + length, n)
    proposals = int((block_end - position[starts] - 1).sum())
    rate = float(accepted.sum()) / proposals if proposals else math.nan
    moved = _blocks(accepted, length, chains).any(axis=1)
    return FilterResult(accepted, state, state[last], rate, moved, proposals)


def _blocks(values: np.ndarray, length: int, chains: int) -> np.ndarray:
    """(chains, length) view of per-candidate values; the last block padded with -1/False."""
    pad = chains * length - len(values)
    fill = False if values.dtype == np.bool_ else -1
    return np.pad(values, (0, pad), constant_values=fill).reshape(chains, length)


def drs_filter(
    log_ratio: np.ndarray | torch.Tensor,
    seed: int,
    gamma: float | None = None,
    gamma_percentile: float | None = None,
    eps: float = 1e-6,
) -> FilterResult:
    """DRS over the set with l_max its maximum; gamma 0 (exact) unless one of the two is given.

    gamma_percentile (0..100) takes gamma as that percentile of F over the candidates with a
    finite logit, as `drs.gamma_for_percentile` does over a pilot.
    """
    logits = _as_logits(log_ratio)
    if gamma is not None and gamma_percentile is not None:
        raise ValueError("give at most one of gamma and gamma_percentile")
    if gamma is not None and not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma!r}")
    if gamma_percentile is not None and not 0.0 <= gamma_percentile <= 100.0:
        raise ValueError(f"gamma_percentile must lie in [0, 100], got {gamma_percentile!r}")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    if np.isposinf(logits).any():
        raise ValueError("DRS needs a finite maximum logit; the set contains +inf")
    logits = torch.from_numpy(np.where(np.isnan(logits), -np.inf, logits))
    log_max = logits.max()  # -inf when nothing is finite, and then nothing is accepted
    finite = logits[torch.isfinite(logits)]
    if gamma_percentile is not None and len(finite):
        gamma = drs.gamma_for_percentile(finite, gamma_percentile, eps)
    scores = drs.score(logits, log_max, torch.tensor(eps, dtype=torch.float64))
    accepted = (_log_uniforms(seed, len(logits)) < F.logsigmoid(scores - (gamma or 0.0))).numpy()
    state = np.where(accepted, np.arange(len(accepted), dtype=np.int64), -1)
    final = np.flatnonzero(accepted)
    return FilterResult(
        accepted, state, final, float(accepted.mean()), np.ones(len(final), dtype=bool),
        len(accepted),
    )  # fmt: skip


def _moves(log_u, proposed, current):
    """The MH test on arrays or plain floats: U < exp(proposed - current), in log space."""
    return log_u < proposed - current


def _step_columns(
    logits: np.ndarray, log_u: np.ndarray, length: int, chains: int
) -> tuple[np.ndarray, np.ndarray]:
    """All chains advance together, one position of their blocks per step; returns
    (accepted, starts) in candidate order."""
    pad = chains * length - len(logits)  # the last block's tail: -inf is never accepted
    proposed = np.pad(logits, (0, pad), constant_values=-np.inf).reshape(chains, length)
    proposed = np.ascontiguousarray(proposed.T)  # (length, chains): row k is every chain's k-th
    log_u = np.ascontiguousarray(np.pad(log_u, (0, pad)).reshape(chains, length).T)
    accepted = np.zeros((length, chains), dtype=bool)
    starts = np.zeros((length, chains), dtype=bool)
    current = np.full(chains, -np.inf)
    started = np.zeros(chains, dtype=bool)
    for k in range(length):
        move = started & _moves(log_u[k], proposed[k], current)
        start = ~started & (proposed[k] > -np.inf)
        np.copyto(current, proposed[k], where=move | start)
        started |= start
        accepted[k], starts[k] = move, start
    n = len(logits)
    return accepted.T.reshape(-1)[:n], starts.T.reshape(-1)[:n]  # back to candidate order


def _walk(logits: np.ndarray, log_u: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The same chains one candidate at a time, on Python floats (same IEEE arithmetic)."""
    accepted = [False] * len(logits)
    starts = [False] * len(logits)
    current, started = -math.inf, False
    for i, (proposed, u) in enumerate(zip(logits.tolist(), log_u.tolist(), strict=True)):
        if i % length == 0:
            started = False
        if started and _moves(u, proposed, current):
            current, accepted[i] = proposed, True
        elif not started and proposed > -math.inf:
            current, started, starts[i] = proposed, True, True
    return np.array(accepted, dtype=bool), np.array(starts, dtype=bool)


def _as_logits(log_ratio: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(log_ratio, torch.Tensor):
        log_ratio = log_ratio.detach().cpu().double().numpy()
    logits = np.asarray(log_ratio, dtype=np.float64)
    if logits.ndim != 1 or len(logits) == 0:
        raise ValueError(f"log_ratio must be a non-empty 1-D array, got shape {logits.shape}")
    return logits


def _log_uniforms(seed: int, n: int) -> torch.Tensor:
    """log U_1..U_n, float64, from one generator seeded with `seed`, in candidate order."""
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return torch.rand(n, generator=make_generator(int(seed)), dtype=torch.float64).log()


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)
