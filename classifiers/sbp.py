"""Structured Bayesian Pruning (SBP): multiplicative log-normal noise that removes units.

Per output channel of a conv layer (right after the convolution, before its bias, BN and
ReLU) and per input feature of a dense layer, the layer multiplies by a noise variable
theta with

    q(log theta) = N(mu, sigma^2) truncated to [a, b] = [-20, 0]
    p(log theta) = Uniform[a, b]            (log-uniform prior on theta)

and is trained by stochastic variational inference from a pretrained network: loss
N * mean(CE) + kl_weight * sum(KL). A unit is kept iff SNR = E[theta] / std[theta] > 1;
at test time the layer multiplies by E[theta] * 1[SNR > 1] (never removing every unit of
a layer: if all fall below 1 the highest-SNR unit stays), which classifiers.compress then
folds into a physically smaller plain network.

All statistics are computed in float64 (one value per unit, so it costs nothing) from
log-space normal CDFs. Three things need care beyond that:
- the interval lies entirely in one tail of N(mu, sigma^2), l > 10 sigmas from mu: log Z
  and the entropy term are both ~l^2/2 and cancel (l reaches 1e10 at sigma = e^-20), so
  there the moments come from Gauss-Laguerre quadrature of the density of the distance
  to the nearer bound, which decays like exp(-l y - y^2 / 2): nothing cancels;
- sigma * std(standardised variable) < 1e-4: Var[theta] / E[theta]^2 is below float64
  resolution as a difference of moments, so its leading term sigma^2 Var[s] is used;
- torch's log_ndtr gradient is wrong below about -1e8 (inf at -6e9): `log_ndtr` here
  uses the asymptotic hazard -x - 1/x there.
Note what SNR measures: noise, not size. A unit with mu -> a and tiny sigma has theta
pinned at e^-20 with a huge SNR, so it is kept (contributing 2e-9 of its input); units
the KL pushes towards the prior have a large sigma and an SNR near 1/3, and go.

Usage:
    model = train_sbp(pretrained, x_train, y_train, kl_weight=1.0, epochs=60)
    small, report = compress(model)          # classifiers.compress.compress
    prediction = predict(model, x)           # deterministic: E[theta] * mask
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.special import ndtri

from classifiers.common import Prediction, deterministic
from classifiers.compress import BlockNet, CompressionReport, compress

__all__ = [
    "SBPLayer",
    "TruncatedLogNormalStats",
    "truncated_log_normal_stats",
    "truncated_log_normal_kl",
    "sample_log_theta",
    "keep_mask",
    "add_sbp",
    "kl_divergence",
    "fit",
    "train_sbp",
    "compress",
    "CompressionReport",
    "predict",
]

LOG_THETA_MIN, LOG_THETA_MAX = -20.0, 0.0  # [a, b]: the support of log theta
PARAM_MIN, PARAM_MAX = -20.0, 5.0  # mu and log sigma are clamped to this range
INIT_MU, INIT_LOG_SIGMA = 0.0, -5.0
SNR_THRESHOLD = 1.0

_LOG_2PI = math.log(2 * math.pi)
_LN2 = math.log(2.0)
_TAIL_DISTANCE = 10.0  # beyond this many sigmas outside [a, b], use the one-sided quadrature
_SMALL_SPREAD = 1e-4  # below this sigma * std(s), use the leading term of Var/E^2
_LAGUERRE_NODES, _LAGUERRE_WEIGHTS = np.polynomial.laguerre.laggauss(64)


class TruncatedLogNormalStats(NamedTuple):
    """Per-unit statistics of q(theta), float64, each shaped like mu."""

    kl: torch.Tensor  # KL(q || log-uniform prior) in nats
    mean: torch.Tensor  # E[theta]
    snr: torch.Tensor  # E[theta] / std[theta]


class _LogNdtr(torch.autograd.Function):
    """torch.special.log_ndtr with a gradient that stays right far in the lower tail.

    torch's own backward returns garbage below about -1e8 (inf at -6e9, so NaN once
    multiplied by a zero upstream gradient); d/dx log Phi(x) = phi(x) / Phi(x) ~ -x - 1/x.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        value = torch.special.log_ndtr(x)
        ctx.save_for_backward(x, value)
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, value = ctx.saved_tensors
        deep = x < -1e4
        safe = torch.where(deep, -1e4, x)
        hazard = torch.where(
            deep, -x - 1 / torch.where(deep, x, -1e4), torch.exp(_log_phi(safe) - value)
        )
        return grad * hazard


def log_ndtr(x: torch.Tensor) -> torch.Tensor:
    return _LogNdtr.apply(x)


def _log_phi(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * x * x - 0.5 * _LOG_2PI


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(d)) for d < 0, accurate at both ends (Maechler's switch at -log 2)."""
    d = d.clamp_max(-1e-300)
    near = d > -_LN2
    # each branch sees only arguments in its own range, so the unused one stays finite
    # and its gradient (multiplied by zero in torch.where) cannot turn into NaN
    near_d = torch.where(near, d, -_LN2)
    far_d = torch.where(near, -_LN2 - 1.0, d)
    return torch.where(near, torch.log(-torch.expm1(near_d)), torch.log1p(-torch.exp(far_d)))


def log_diff_ndtr(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for upper > lower, without cancellation in either tail."""
    right = lower > 0  # both in the upper tail: use Phi(x) = 1 - Phi(-x)
    up_r, lo_r = torch.where(right, upper, 2.0), torch.where(right, lower, 1.0)
    up_l, lo_l = torch.where(right, 0.0, upper), torch.where(right, -1.0, lower)
    right_value = log_ndtr(-lo_r) + _log1mexp(log_ndtr(-up_r) - log_ndtr(-lo_r))
    left_value = log_ndtr(up_l) + _log1mexp(log_ndtr(lo_l) - log_ndtr(up_l))
    return torch.where(right, right_value, left_value)


def _general_stats(mu, sigma, alpha, beta, a, b, kl_only):
    """Closed forms from log-space CDF differences; accurate unless one tail is far."""
    log_z = log_diff_ndtr(beta, alpha)
    ratio_a = torch.exp(_log_phi(alpha) - log_z)  # phi(alpha) / Z
    ratio_b = torch.exp(_log_phi(beta) - log_z)  # phi(beta) / Z
    boundary = alpha * ratio_a - beta * ratio_b
    entropy_s = 0.5 * (_LOG_2PI + 1.0) + log_z + 0.5 * boundary
    kl = math.log(b - a) - torch.log(sigma) - entropy_s
    if kl_only:
        return (kl,)
    shifted_1 = log_diff_ndtr(beta - sigma, alpha - sigma)
    shifted_2 = log_diff_ndtr(beta - 2 * sigma, alpha - 2 * sigma)
    log_mean = mu + 0.5 * sigma**2 + shifted_1 - log_z
    # log(E[theta^2] / E[theta]^2): the cumulant generating function's second difference,
    # with the quadratic part sigma^2 taken out exactly (mu cancels analytically)
    log_ratio = sigma**2 + shifted_2 - 2 * shifted_1 + log_z
    var_s = (1.0 + boundary - (ratio_a - ratio_b) ** 2).clamp_min(1e-300)
    small = sigma * var_s.sqrt() < _SMALL_SPREAD
    rel_var = torch.where(small, sigma**2 * var_s, torch.expm1(log_ratio.clamp_min(1e-300)))
    return kl, log_mean, rel_var


def _tail_stats(sigma, distance, upward, a, b, kl_only):
    """One-sided regime: log theta = bound + sign * sigma * y / l, y ~ e^{-y - y^2/(2 l^2)}.

    `distance` l > 10 is how many sigmas mu lies outside [a, b]; `upward` says mu < a
    (log theta sits just above a) rather than mu > b (just below b). The far bound is
    more than 50 / l sigmas away, so its truncation is negligible.
    """
    nodes = torch.as_tensor(_LAGUERRE_NODES, dtype=sigma.dtype, device=sigma.device)
    weights = torch.as_tensor(_LAGUERRE_WEIGHTS, dtype=sigma.dtype, device=sigma.device)
    l = distance[..., None]
    q = weights * torch.exp(-(nodes**2) / (2 * l**2))  # (..., nodes)
    mass = q.sum(-1)
    p = q / mass[..., None]
    mean_y = (p * nodes).sum(-1)
    mean_y2 = (p * nodes**2).sum(-1)
    entropy_s = mean_y + mean_y2 / (2 * distance**2) - torch.log(distance) + torch.log(mass)
    kl = math.log(b - a) - torch.log(sigma) - entropy_s
    if kl_only:
        return (kl,)
    sign = torch.where(upward, 1.0, -1.0).to(sigma)
    step = (sign * sigma / distance)[..., None]  # log theta = bound + step * y
    centred = torch.expm1(step * nodes)  # theta / e^bound - 1, accurate for tiny steps
    m1 = (p * centred).sum(-1)
    bound = torch.where(upward, a, b).to(sigma)
    log_mean = bound + torch.log1p(m1)
    rel_var = (p * (centred - m1[..., None]) ** 2).sum(-1) / (1 + m1) ** 2
    return kl, log_mean, rel_var


def _stats(mu, log_sigma, a, b, kl_only):
    if not a < b:
        raise ValueError(f"need a < b, got [{a}, {b}]")
    mu, log_sigma = torch.broadcast_tensors(mu.double(), log_sigma.double())
    shape = mu.shape
    mu, log_sigma = mu.reshape(-1), log_sigma.reshape(-1)  # (units,)
    sigma = torch.exp(log_sigma)
    alpha, beta = (a - mu) / sigma, (b - mu) / sigma
    upward = alpha > 0
    distance = torch.where(upward, alpha, -beta)  # sigmas from mu to the nearer bound
    width = (b - a) / sigma
    tail = (distance > _TAIL_DISTANCE) & (width * distance > 50) & (2 * sigma < 0.5 * distance)
    # the general branch sees harmless values where the tail one is used: its unused
    # outputs and their gradients stay finite, so nothing NaN leaks through
    safe_mu = torch.where(tail, 0.5 * (a + b), mu)
    safe_sigma = torch.where(tail, 1.0, sigma)
    values = _general_stats(
        safe_mu, safe_sigma, (a - safe_mu) / safe_sigma, (b - safe_mu) / safe_sigma, a, b, kl_only
    )
    if tail.any():
        where = tail.nonzero(as_tuple=True)
        one_sided = _tail_stats(sigma[where], distance[where], upward[where], a, b, kl_only)
        values = tuple(v.index_put(where, t) for v, t in zip(values, one_sided, strict=True))
    return tuple(v.reshape(shape) for v in values)


def truncated_log_normal_kl(
    mu: torch.Tensor,
    log_sigma: torch.Tensor,
    a: float = LOG_THETA_MIN,
    b: float = LOG_THETA_MAX,
) -> torch.Tensor:
    """KL(q || log-uniform prior) per unit, float64, differentiable (the training penalty)."""
    return _stats(mu, log_sigma, a, b, kl_only=True)[0]


def truncated_log_normal_stats(
    mu: torch.Tensor,
    log_sigma: torch.Tensor,
    a: float = LOG_THETA_MIN,
    b: float = LOG_THETA_MAX,
) -> TruncatedLogNormalStats:
    """KL to the log-uniform prior, E[theta] and SNR of log theta ~ N(mu, sigma^2)|[a, b].

    Inputs of any float dtype (not clamped here: clamp first if you need the layer's
    range); outputs float64, finite for mu in [-25, 5] and log sigma in [-20, 5].
    Differentiable in mu and log_sigma.
    """
    kl, log_mean, rel_var = _stats(mu, log_sigma, a, b, kl_only=False)
    snr = torch.rsqrt(rel_var.clamp_min(1e-300))
    return TruncatedLogNormalStats(kl, torch.exp(log_mean.clamp(a, b)), snr)


def _ndtri_from_log(log_p: torch.Tensor) -> torch.Tensor:
    """Phi^-1(exp(log_p)), also where exp(log_p) underflows (Newton on log_ndtr there)."""
    x = ndtri(torch.exp(log_p))
    deep = log_p < -700.0
    if deep.any():  # rare: only for units pinned far into one tail
        lp = log_p[deep]
        y = -torch.sqrt(-2 * lp - torch.log(-2 * lp) - _LOG_2PI)  # asymptotic start
        for _ in range(4):
            slope = torch.exp(_log_phi(y) - log_ndtr(y))  # d log_ndtr / dy
            y = y - (log_ndtr(y) - lp) / slope
        x = x.masked_scatter(deep, y)
    return x


def sample_log_theta(
    mu: torch.Tensor,
    log_sigma: torch.Tensor,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    a: float = LOG_THETA_MIN,
    b: float = LOG_THETA_MAX,
) -> torch.Tensor:
    """Draws of log theta, shape `shape + mu.shape`, float64, reparameterised in mu, sigma.

    log theta = mu + sigma * Phi^-1(Phi(alpha) + u Z), u ~ U(0, 1), in log space (an
    interval in the upper tail is mirrored into the lower one first), clipped to [a, b].
    Gradients come from the implicit function Phi(s) = Phi(alpha) + v Z, with
    ds/dalpha = (1 - v) phi(alpha) / phi(s) and ds/dbeta = v phi(beta) / phi(s).
    """
    mu, log_sigma = torch.broadcast_tensors(mu.double(), log_sigma.double())
    sigma = torch.exp(log_sigma)
    alpha, beta = (a - mu) / sigma, (b - mu) / sigma
    u = torch.rand(shape + mu.shape, generator=generator, dtype=torch.float64)
    u = u.to(mu.device).clamp(1e-12, 1 - 1e-12)
    with torch.no_grad():
        # per unit: sample -s on [-beta, -alpha] when alpha > 0, where CDFs stay resolvable
        mirror = alpha > 0
        lo, hi = torch.where(mirror, -beta, alpha), torch.where(mirror, -alpha, beta)
        log_lo, log_z = log_ndtr(lo), log_diff_ndtr(hi, lo)
        log_phi_alpha, log_phi_beta = _log_phi(alpha), _log_phi(beta)
        # per draw
        s = _ndtri_from_log(torch.logaddexp(log_lo, torch.log(u) + log_z))
        s = torch.where(mirror, -s, s)
        s = torch.minimum(torch.maximum(s, alpha), beta)
        v = torch.where(mirror, 1 - u, u)
        log_phi_s = _log_phi(s)
        grad_alpha = torch.exp(torch.log1p(-v) + log_phi_alpha - log_phi_s).clamp_max(1e4)
        grad_beta = torch.exp(torch.log(v) + log_phi_beta - log_phi_s).clamp_max(1e4)
    s = s + grad_alpha * (alpha - alpha.detach()) + grad_beta * (beta - beta.detach())
    return (mu + sigma * s).clamp(a, b)


def keep_mask(snr: torch.Tensor, threshold: float = SNR_THRESHOLD) -> torch.Tensor:
    """Units with SNR > threshold; the highest-SNR unit is kept if none passes."""
    mask = snr > threshold
    if not mask.any():
        mask = torch.zeros_like(mask)
        mask[snr.argmax()] = True
    return mask


class SBPLayer(nn.Module):
    """Multiplies dim 1 of its input (channels or features) by theta, one per unit.

    Training mode: an independent theta per example and unit (broadcast over spatial
    dimensions), drawn from `noise_generator` (torch's global generator when None).
    Eval mode: the deterministic E[theta] * 1[SNR > 1] (see `keep_mask`).
    Parameters `mu` and `log_sigma` are clamped to [-20, 5] when used; `project_()`
    clamps them in place after an optimiser step.
    """

    def __init__(self, units: int):
        super().__init__()
        if units < 1:
            raise ValueError(f"an SBP layer needs at least one unit, got {units}")
        self.mu = nn.Parameter(torch.full((units,), INIT_MU))
        self.log_sigma = nn.Parameter(torch.full((units,), INIT_LOG_SIGMA))
        # a job's own generator keeps its draws apart from other threads' (not saved)
        self.noise_generator: torch.Generator | None = None

    @property
    def units(self) -> int:
        return self.mu.numel()

    def clamped(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu.clamp(PARAM_MIN, PARAM_MAX), self.log_sigma.clamp(PARAM_MIN, PARAM_MAX)

    @torch.no_grad()
    def project_(self) -> None:
        self.mu.clamp_(PARAM_MIN, PARAM_MAX)
        self.log_sigma.clamp_(PARAM_MIN, PARAM_MAX)

    def stats(self) -> TruncatedLogNormalStats:
        return truncated_log_normal_stats(*self.clamped())

    def kl(self) -> torch.Tensor:
        """Sum of the per-unit KL divergences to the prior (float32 scalar, differentiable)."""
        return truncated_log_normal_kl(*self.clamped()).sum().float()

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        return keep_mask(self.stats().snr)

    @torch.no_grad()
    def multiplier(self) -> torch.Tensor:
        """E[theta] * 1[kept] per unit, float64: what eval mode multiplies by."""
        # cached until mu or log sigma change in place (an optimiser step bumps _version)
        key = (self.mu._version, self.log_sigma._version, self.mu.data_ptr(), self.mu.device)
        if getattr(self, "_multiplier_key", None) != key:
            stats = self.stats()
            self._multiplier = stats.mean * keep_mask(stats.snr)
            self._multiplier_key = key
        return self._multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.units:
            raise ValueError(f"expected input (N, {self.units}, ...), got {tuple(x.shape)}")
        if self.training:
            draws = sample_log_theta(*self.clamped(), (x.shape[0],), self.noise_generator)
            theta = draws.exp()  # (N, units)
        else:
            theta = self.multiplier()[None]  # (1, units)
        return x * theta.to(x.dtype).view(*theta.shape, *([1] * (x.dim() - 2)))

    def extra_repr(self) -> str:
        return f"units={self.units}"


def sbp_layers(model: nn.Module) -> list[SBPLayer]:
    return [m for m in model.modules() if isinstance(m, SBPLayer)]


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """Total KL of all SBP layers in `model` (float32 scalar; 0 when it has none)."""
    layers = sbp_layers(model)
    if not layers:
        return torch.zeros(())
    mu, log_sigma = zip(*(layer.clamped() for layer in layers), strict=True)
    return truncated_log_normal_kl(torch.cat(mu), torch.cat(log_sigma)).sum().float()


def add_sbp(model: BlockNet) -> BlockNet:
    """A copy of a plain BlockNet with a fresh SBP layer in every block (mu 0, log sigma -5)."""
    if not isinstance(model, BlockNet):
        raise ValueError(f"SBP layers go into a classifiers.compress.BlockNet, got {type(model)}")
    if sbp_layers(model):
        raise ValueError("the model already has SBP layers")
    noisy = copy.deepcopy(model)
    device = next(model.parameters()).device
    for block in noisy.blocks:
        block.sbp = SBPLayer(block.units).to(device)
    return noisy


def _as_tensor(values) -> torch.Tensor:
    if isinstance(values, np.ndarray):  # a copy: the shared digits arrays are read-only
        return torch.from_numpy(np.array(values))
    return torch.as_tensor(values)


def _as_inputs(model: nn.Module, x, what: str = "x") -> torch.Tensor:
    x = _as_tensor(x)
    if not x.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {x.dtype}")
    expected = tuple(getattr(model, "input_shape", x.shape[1:]))
    if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected or x.shape[0] == 0:
        raise ValueError(
            f"{what} must have shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return x.float()


def fit(
    model: nn.Module,
    x,
    y,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    kl_weight: float = 1.0,
    noise_lr_factor: float = 1.0,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, float]]:
    """Minimise N * mean(CE) + kl_weight * penalty(model) with Adam; returns per-epoch logs.

    Parameters whose name contains "sbp." or "log_sigma2" (the variational noise of SBP
    and sparse VD) get lr * noise_lr_factor. The learning rate decays linearly to 0 over
    the second half. Seeded: shuffling and noise draws come from `seed` (the global RNG
    is restored afterwards). SBP parameters are clamped back to range after each step.
    """
    x, y = _as_inputs(model, x), _as_tensor(y)
    if y.shape != (len(x),) or y.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"y must be integer labels of shape ({len(x)},), got {tuple(y.shape)}")
    if epochs < 1 or batch_size < 1 or lr <= 0 or kl_weight < 0 or noise_lr_factor <= 0:
        raise ValueError("need epochs >= 1, batch_size >= 1, lr > 0, kl_weight >= 0")
    device = next(model.parameters()).device
    x, y = x.to(device), y.long().to(device)
    noise = [p for n, p in model.named_parameters() if "sbp." in n or "log_sigma2" in n]
    noise_ids = {id(p) for p in noise}
    weights = [p for p in model.parameters() if id(p) not in noise_ids]
    groups = [{"params": weights, "lr": lr}]
    if noise:
        groups.append({"params": noise, "lr": lr * noise_lr_factor})
    optimizer = torch.optim.Adam(groups)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    generator = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in range(epochs):
            decay = min(1.0, 2.0 * (1.0 - epoch / epochs))
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * decay
            order = torch.randperm(len(x), generator=generator).to(device)
            totals = {"ce": 0.0, "penalty": 0.0}
            for start in range(0, len(x), batch_size):
                batch = order[start : start + batch_size]
                ce = F.cross_entropy(model(x[batch]), y[batch])
                reg = penalty(model) if penalty is not None else torch.zeros((), device=device)
                loss = len(x) * ce + kl_weight * reg
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for layer in sbp_layers(model):
                    layer.project_()
                totals["ce"] += ce.item() * len(batch) / len(x)
                totals["penalty"] = reg.detach().item()
            history.append({"epoch": epoch + 1, **totals})
            if log is not None:
                log(f"epoch {epoch + 1}: ce {totals['ce']:.4f} penalty {totals['penalty']:.1f}")
    return history


def train_sbp(
    model: BlockNet,
    x,
    y,
    *,
    kl_weight: float = 1.0,
    epochs: int = 100,
    batch_size: int = 128,
    lr: float = 1e-3,
    sbp_lr_factor: float = 10.0,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> BlockNet:
    """Fine-tune a pretrained BlockNet with SBP layers; returns the SBP network, eval mode.

    A plain model is copied and gets SBP layers (`add_sbp`); a model that already has them
    is trained in place. Loss N * mean(CE) + kl_weight * sum(KL); x (N, *input_shape)
    float, y (N,) integer labels, on the model's device.
    """
    if not isinstance(model, BlockNet):
        raise ValueError(f"train_sbp needs a classifiers.compress.BlockNet, got {type(model)}")
    noisy = model if sbp_layers(model) else add_sbp(model)
    fit(
        noisy,
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        penalty=kl_divergence,
        kl_weight=kl_weight,
        noise_lr_factor=sbp_lr_factor,
        seed=seed,
        log=log,
    )
    return noisy.eval()


@torch.no_grad()
def predict(model: nn.Module, x) -> Prediction:
    """Deterministic prediction (E[theta] * mask in SBP layers; plain nets as they are).

    x: (N, *model.input_shape) floats. Raises ValueError on a bad shape or non-finite
    values. The model is left in eval mode; tensors come back on the model's device.
    """
    x = _as_inputs(model, x)
    model.eval()
    logits = model(x.to(next(model.parameters()).device))
    return deterministic(logits.float().softmax(-1))
