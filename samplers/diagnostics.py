"""Convergence diagnostics of a (chains x draws) trace: split R-hat and ESS.

Both follow ArviZ's defaults (Vehtari, Gelman, Simpson, Carpenter and Buerkner 2021,
"Rank-normalization, folding, and localization"), so the figures agree with
`arviz.rhat` and `arviz.ess` on the same array:

- `r_hat`: rank-normalised split R-hat, ArviZ's method "rank": each chain is split in
  half, all draws are replaced by the normal scores of their ranks, and R-hat is the
  larger of that "bulk" value and the same on the draws folded around their median
  (|x - median|, which catches chains that agree in location but not in scale).
- `ess`: bulk effective sample size, ArviZ's method "bulk": the split, rank-normalised
  draws, autocorrelations by FFT, Geyer's initial monotone sequence.

`TraceRecorder` keeps a bounded trace of a run, one step at a time, and turns it into a
summary with plain-English warnings (see its docstring for the rule).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import fft, stats

MIN_DRAWS, MIN_CHAINS = 4, 2
R_HAT_LIMIT = 1.05
ESS_PER_CHAIN = 0.5


def r_hat(trace: np.ndarray) -> float:
    """Rank-normalised split R-hat of a (chains, draws) array (NaN if undefined)."""
    trace = np.asarray(trace, dtype=np.float64)
    if not _valid(trace, MIN_CHAINS):
        return math.nan
    split = _split_chains(trace)
    bulk = _plain_r_hat(_z_scale(split))
    tail = _plain_r_hat(_z_scale(np.abs(split - np.median(split))))
    return max(bulk, tail)


def ess(trace: np.ndarray) -> float:
    """Bulk effective sample size of a (chains, draws) array (NaN if undefined)."""
    trace = np.asarray(trace, dtype=np.float64)
    if not _valid(trace, 1):
        return math.nan
    return _ess(_z_scale(_split_chains(trace)))


def _valid(trace: np.ndarray, min_chains: int) -> bool:
    return (
        trace.ndim == 2
        and trace.shape[0] >= min_chains
        and trace.shape[1] >= MIN_DRAWS
        and bool(np.isfinite(trace).all())
    )


def _split_chains(trace: np.ndarray) -> np.ndarray:
    """Each chain's first and last halves as two chains (the middle draw of an odd
    length is dropped), so a trend within chains shows up as disagreement."""
    half = trace.shape[1] // 2
    return np.concatenate([trace[:, :half], trace[:, -half:]])


def _z_scale(trace: np.ndarray) -> np.ndarray:
    """Normal scores of the ranks (Blom's offset 3/8), ties averaged."""
    ranks = stats.rankdata(trace, method="average").reshape(trace.shape)
    return stats.norm.ppf((ranks - 0.375) / (trace.size + 0.25))


def _plain_r_hat(trace: np.ndarray) -> float:
    draws = trace.shape[1]
    between = draws * np.var(trace.mean(1), ddof=1)
    within = np.mean(np.var(trace, axis=1, ddof=1))
    return float(np.sqrt((between / within + draws - 1) / draws))


def _autocovariance(trace: np.ndarray) -> np.ndarray:
    """Per-chain autocovariance at every lag, by FFT (biased estimate: divides by n)."""
    draws = trace.shape[1]
    size = fft.next_fast_len(2 * draws)
    centred = trace - trace.mean(1, keepdims=True)
    spectrum = np.fft.rfft(centred, n=size, axis=1)
    return np.fft.irfft(spectrum * np.conjugate(spectrum), n=size, axis=1)[:, :draws] / draws


def _ess(trace: np.ndarray) -> float:
    chains, draws = trace.shape
    if np.ptp(trace) < np.finfo(float).resolution:
        return float(trace.size)
    acov = _autocovariance(trace)
    mean_var = np.mean(acov[:, 0]) * draws / (draws - 1.0)
    var_plus = mean_var * (draws - 1.0) / draws
    if chains > 1:
        var_plus += np.var(trace.mean(1), ddof=1)
    rho = 1.0 - (mean_var - acov.mean(0)) / var_plus  # rho[t] for every lag t
    rho[0] = 1.0
    # Geyer's initial positive sequence: sum pairs (rho[t], rho[t+1]) while positive.
    kept = np.zeros(draws)
    kept[:2] = rho[:2]
    t, even, odd = 1, 1.0, rho[1]
    while t < draws - 3 and even + odd > 0.0:
        even, odd = rho[t + 1], rho[t + 2]
        if even + odd >= 0:
            kept[t + 1], kept[t + 2] = even, odd
        t += 2
    last = t - 2
    if even > 0:
        kept[last + 1] = even
    # Initial monotone sequence: pair sums may not grow.
    for t in range(1, last - 1, 2):
        if kept[t + 1] + kept[t + 2] > kept[t - 1] + kept[t]:
            kept[t + 1] = kept[t + 2] = (kept[t - 1] + kept[t]) / 2.0
    total = chains * draws
    tau = -1.0 + 2.0 * kept[: last + 1].sum() + kept[last + 1 : last + 2].sum()
    tau = max(tau, 1.0 / np.log10(total))
    return float(total / tau)


class TraceRecorder:
    """A bounded trace of one run, fed one step at a time, and its summary.

    Keeps the first `max_chains` rows and at most `max_draws` values per chain: when a
    chain's buffer is full every chain keeps every other value and records only every
    other step from then on (the stride doubles), so a 10,000-step run costs the same
    memory as a short one and still spans the whole run. Warm-up steps are skipped.

    Warning rule, `summary()`: split R-hat above 1.05 (Vehtari et al.'s threshold: the
    chains disagree) or bulk ESS below 0.5 x the traced chains (fewer than half an
    effective draw per chain over the whole post-warm-up run: the chains hardly moved).
    Both are None, with a reason, when undefined: a method without a trace, fewer than
    2 chains or fewer than 4 post-warm-up draws per chain.
    """

    def __init__(self, max_chains: int = 256, max_draws: int = 1000):
        assert max_chains >= 1 and max_draws >= 2 * MIN_DRAWS, "recorder too small"
        self.max_chains, self.max_draws = max_chains, max_draws
        self.values: np.ndarray | None = None  # (chains, max_draws)
        self.counts: np.ndarray | None = None  # (chains,) values kept
        self.seen: np.ndarray | None = None  # (chains,) post-warm-up steps seen
        self.stride = 1
        self.untraced = False

    def record(self, trace: torch.Tensor | None, in_warmup: torch.Tensor | None = None) -> None:
        """Add one step: `info.trace` and `info.in_warmup` of the rows of one run."""
        if trace is None:
            self.untraced = True
            return
        if self.values is None:
            chains = min(len(trace), self.max_chains)
            self.values = np.zeros((chains, self.max_draws))
            self.counts = np.zeros(chains, dtype=np.int64)
            self.seen = np.zeros(chains, dtype=np.int64)
        rows = min(len(trace), len(self.values))  # the first chains seen, while they last
        values = trace[:rows].detach().double().cpu().numpy()
        live = np.zeros(len(self.values), dtype=bool)
        live[:rows] = True
        if in_warmup is not None:
            live[:rows] &= ~in_warmup[:rows].cpu().numpy()
        values = np.pad(values, (0, len(self.values) - rows))
        keep = live & (self.seen % self.stride == 0)
        chains = np.flatnonzero(keep)
        self.values[chains, self.counts[chains]] = values[chains]
        self.counts[chains] += 1
        self.seen[live] += 1
        if self.counts.max() >= self.max_draws:
            self._thin()

    def _thin(self) -> None:
        kept = self.values[:, ::2].copy()
        self.values[:] = 0.0
        self.values[:, : kept.shape[1]] = kept
        self.counts = (self.counts + 1) // 2
        self.stride *= 2

    def trace(self) -> np.ndarray:
        """(chains, draws) of the recorded values, every chain cut to the shortest
        (keeping each chain's most recent draws)."""
        if self.values is None:
            return np.zeros((0, 0))
        draws = int(self.counts.min())
        index = self.counts[:, None] - draws + np.arange(draws)[None, :]
        return np.take_along_axis(self.values, index, axis=1)

    def summary(self) -> dict[str, Any]:
        """{"r_hat", "ess", "chains", "draws", "warnings", "reason"}; reason says why
        r_hat and ess are None (None when they are defined)."""
        trace = self.trace()
        chains, draws = trace.shape
        out: dict[str, Any] = {"r_hat": None, "ess": None, "chains": chains, "draws": draws}
        if self.untraced:
            return out | {"warnings": [], "reason": "this method has no per-chain trace"}
        if chains < MIN_CHAINS or draws < MIN_DRAWS:
            reason = (
                f"too short to check mixing: {chains} chain(s) with {draws} draw(s) after "
                f"warm-up (need {MIN_CHAINS} chains and {MIN_DRAWS} draws)"
            )
            return out | {"warnings": [], "reason": reason}
        if not np.isfinite(trace).all():
            return out | {"warnings": [], "reason": "the trace has non-finite values"}
        if np.ptp(trace) == 0.0:
            return out | {"warnings": [], "reason": "every traced value is the same"}
        r, n = r_hat(trace), ess(trace)
        found = warnings(r, n, chains)
        # Chains that each stayed at one value have R-hat +inf, which JSON cannot carry.
        r_json = r if math.isfinite(r) else None
        return out | {"r_hat": r_json, "ess": n, "warnings": found, "reason": None}


def warnings(r_hat_value: float, ess_value: float, chains: int) -> list[str]:
    """Plain-English warnings for a traced run (empty when the chains look mixed)."""
    found = []
    if not math.isfinite(r_hat_value):
        found.append(
            "chains did not mix: every chain stayed at its own value after warm-up. "
            "Run more steps (a local method may need one with global moves: isir, ex2mcmc)."
        )
    elif r_hat_value > R_HAT_LIMIT:
        found.append(
            f"chains did not mix: split R-hat {r_hat_value:.2f} > {R_HAT_LIMIT} (chains "
            "disagree with each other); samples may over-represent where chains started. "
            "Run more steps (a local method may need one with global moves: isir, ex2mcmc)."
        )
    if ess_value < ESS_PER_CHAIN * chains:
        found.append(
            f"chains barely moved: effective sample size {ess_value:.0f} < "
            f"{ESS_PER_CHAIN} x {chains} traced chains; consecutive samples are nearly "
            "copies. Run more steps or use a method that accepts more often."
        )
    return found
