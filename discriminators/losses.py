"""Discriminator losses.

Conventions: `logit_real` = l(x) on real x ~ p, `logit_fake` = l(y) on generator
samples y ~ p_G. For pair discriminators `log_d(a, b)` = log d(a, b).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def bce_loss(logit_real: torch.Tensor, logit_fake: torch.Tensor) -> torch.Tensor:
    """Standard GAN discriminator loss: real labelled 1, generated labelled 0."""
    return F.binary_cross_entropy_with_logits(
        logit_real, torch.ones_like(logit_real)
    ) + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))


def implicit_mh_loss(logit_real: torch.Tensor, logit_fake: torch.Tensor) -> torch.Tensor:
    """Implicit-MH bound (thesis eq. 28) for independent proposals.

    With d(x, y) = D(x)(1 - D(y)) the ratio is r = d(y, x) / d(x, y) = exp(l(y) - l(x)),
    and the loss is E[log r + r] over pairs of a real x and a generated y. Its minimiser
    satisfies l(y) - l(x) = log p(y)/p_G(y) - log p(x)/p_G(x): l is the log density ratio
    up to an additive constant.
    """
    assert logit_real.shape == logit_fake.shape, "pair real and fake rows one to one"
    return _log_r_plus_r(logit_fake - logit_real)


def implicit_mh_pair_loss(log_d_xy: torch.Tensor, log_d_yx: torch.Tensor) -> torch.Tensor:
    """Implicit-MH bound for a Markov proposal: x ~ p real, y ~ q(y | x).

    r = d(y, x) / d(x, y); loss E[log r + r]. Its minimiser is the exact MH ratio
    r = p(y) q(x | y) / (p(x) q(y | x)).
    """
    return _log_r_plus_r(log_d_yx - log_d_xy)


def _log_r_plus_r(log_ratio: torch.Tensor, limit: float = 30.0) -> torch.Tensor:
    """mean(log r + r), with exp continued linearly above `limit` so that it cannot
    overflow and pairs far beyond it still get a (large, finite) gradient."""
    capped = log_ratio.clamp(max=limit)
    ratio = capped.exp() * (1.0 + (log_ratio - capped))
    return (log_ratio + ratio).mean()
