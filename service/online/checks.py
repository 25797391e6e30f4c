"""Model compatibility: does the discriminator (and proposal) fit the generator's samples?

Run once per model combination on two latents, so mismatched shapes become a clear 422
that names the discriminator instead of a model error in the middle of a batch.
"""

from __future__ import annotations

import torch

from service.errors import BadModelFile, InvalidRequest
from service.online.plan import build_models
from service.online.resolve import Resolved


def check_shapes(resolved: Resolved, device: torch.device) -> None:
    """Raises InvalidRequest naming the discriminator when the models do not fit."""
    models = build_models(resolved)
    try:
        with torch.inference_mode():
            x = models.generator(torch.zeros(2, models.latent_dim, device=device))
            if models.markov_proposal is not None:
                moved = models.markov_proposal(
                    x, _TwoRowNoise(x.device), torch.ones(2, device=x.device)
                )
                _expect(tuple(moved.shape), tuple(x.shape), "the proposal's output")
            out = models.log_ratio(x) if models.log_ratio else models.log_pair(x, x)
            _expect(tuple(out.shape), (2,), f"{resolved.discriminator.ref}'s output")
    except (BadModelFile, RuntimeError, ValueError, TypeError, AssertionError) as error:
        message = getattr(error, "message", str(error))
        raise InvalidRequest(
            f"{resolved.discriminator.ref} cannot score {resolved.generator.ref}'s samples: "
            f"{message}",
            ("discriminator",),
        ) from None


class _TwoRowNoise:
    """Stand-in Noise for the shape check: zeros, two rows."""

    def __init__(self, device: torch.device):
        self.device, self.batch_size, self.rows = device, 2, [2]

    def normal(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(2, *shape, dtype=dtype, device=self.device)

    uniform = normal


def _expect(shape: tuple, expected: tuple, what: str) -> None:
    if shape != expected:
        raise ValueError(f"{what} has shape {shape} for 2 inputs, expected {expected}")
