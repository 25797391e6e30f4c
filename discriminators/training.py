"""Post-hoc discriminator training for a frozen generator.

The answer to "my GAN shipped without a discriminator": train one against real data
while the generator stays fixed. Two losses for a sample discriminator l(x):

- "bce": the standard GAN loss; its optimum is l = log p / p_G exactly.
- "implicit_mh": the implicit-MH bound for independent proposals; its optimum is
  l = log p / p_G + c for some constant c, which calibration then removes.

and the Markov form of the implicit-MH bound for a pair discriminator d(x, y) trained
for a given proposal q(y | x) (`train_pair_discriminator`).

Example:
    >>> d = MLPDiscriminator(input_dim=2, width=64, depth=2)
    >>> history = train_discriminator(
    ...     d, lambda n, gen: generator(torch.randn(n, 8, generator=gen, device=gen.device)),
    ...     real, loss="implicit_mh", steps=2000)

Randomness: every draw (real minibatch rows, the generator's latents, the proposal's
noise) comes from one `torch.Generator` seeded with `seed` on the training device, so a
run is repeatable given the seed and the discriminator's initial weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from discriminators.losses import bce_loss, implicit_mh_loss, implicit_mh_pair_loss

LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "bce": bce_loss,
    "implicit_mh": implicit_mh_loss,
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_discriminator(
    discriminator: nn.Module,
    sample_fake: Callable[[int, torch.Generator], Tensor],
    real: Tensor,
    *,
    loss: str = "bce",
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> list[float]:
    """Train `discriminator` in place against a frozen generator; return the loss per step.

    Args:
        discriminator: maps a batch (B, ...) to logits (B,). Moved to `device` (it stays
            there) and left in the train/eval mode it came in.
        sample_fake: `sample_fake(n, gen)` returns n generator samples shaped like rows
            of `real`, drawing all randomness from `gen` (a generator on `device`). It is
            called under `torch.no_grad()`, so the generator is never updated.
        real: real samples (N, ...); each step draws `batch_size` rows with replacement.
        loss: "bce" or "implicit_mh" (real and fake rows are paired one to one).
        steps: number of Adam steps.
        device: where to train; default cuda when available, else cpu.
        progress: show a tqdm bar with the running loss.
    """
    assert loss in LOSSES, f"loss must be one of {sorted(LOSSES)}, got {loss!r}"
    loss_fn = LOSSES[loss]
    device = torch.device(device) if device is not None else default_device()
    discriminator.to(device)
    real = real.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def step_loss() -> Tensor:
        rows = torch.randint(len(real), (batch_size,), generator=gen, device=device)
        with torch.no_grad():
            fake = sample_fake(batch_size, gen).to(device)
        return loss_fn(discriminator(real[rows]), discriminator(fake))

    return _optimise(discriminator, step_loss, steps, lr, weight_decay, progress)


def train_pair_discriminator(
    pair: nn.Module,
    propose: Callable[[Tensor, torch.Generator], Tensor],
    real: Tensor,
    *,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> list[float]:
    """Train a pair discriminator in place with the Markov implicit-MH bound.

    Each step draws real x, proposes y = propose(x, gen) ~ q(y | x) (under no_grad) and
    minimises `implicit_mh_pair_loss(pair(x, y), pair(y, x))`. At the optimum
    log d(y, x) - log d(x, y) = log [p(y) q(x | y) / (p(x) q(y | x))], the log MH
    ratio for moving from x to y, within the range [log b, -log b] the pair network
    allows. Train for the proposal the sampler will use. Arguments as in
    `train_discriminator`; `pair(x, y)` returns log d(x, y), shape (B,).
    """
    device = torch.device(device) if device is not None else default_device()
    pair.to(device)
    real = real.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def step_loss() -> Tensor:
        rows = torch.randint(len(real), (batch_size,), generator=gen, device=device)
        x = real[rows]
        with torch.no_grad():
            y = propose(x, gen).to(device)
        return implicit_mh_pair_loss(pair(x, y), pair(y, x))

    return _optimise(pair, step_loss, steps, lr, weight_decay, progress)


def _optimise(
    model: nn.Module,
    step_loss: Callable[[], Tensor],
    steps: int,
    lr: float,
    weight_decay: float,
    progress: bool,
) -> list[float]:
    """Adam on `step_loss()` for `steps` steps; the shared loop of both trainers."""
    assert steps >= 0, "steps must be non-negative"
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    was_training = model.training
    model.train()
    history: list[float] = []
    bar = tqdm(range(steps), disable=not progress, desc="discriminator", leave=False)
    try:
        for step in bar:
            value = step_loss()
            optimiser.zero_grad(set_to_none=True)
            value.backward()
            optimiser.step()
            history.append(value.item())
            if progress and step % 50 == 0:
                bar.set_postfix(loss=f"{history[-1]:.4f}")
    finally:
        bar.close()
        model.train(was_training)
    return history
