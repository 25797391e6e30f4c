"""Plumbing every kernel shares: per-row randomness, the accept/reject rule, batching.

Every state is a NamedTuple of tensors whose first dimension is the chain (row). Rows are
independent, so states from different requests concatenate into one batch and split
back (`concat`, `take`), and each request keeps its own random stream (`Noise`): the
samples a seed produces do not depend on who else shares the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar

import torch

S = TypeVar("S", bound=tuple)


class Info(NamedTuple):
    """Diagnostics of one step, one entry per row.

    The last two fields are optional (None where a kernel has nothing to say), so
    `Info(is_accepted, log_ratio)` still builds one.

    in_warmup: rows whose step was a warm-up step (a step-size adaptation step). Their
    states belong to no exact chain yet: drivers neither emit them in stream mode nor
    trace them for diagnostics. None: the method has no warm-up.
    trace: the scalar per chain that convergence diagnostics follow, after this step (the
    log target for latent methods, the calibrated logit of the current sample for imh).
    None where no such scalar exists (drs trials are i.i.d., not a chain).
    """

    is_accepted: torch.Tensor  # (B,) bool
    log_ratio: torch.Tensor  # (B,) log acceptance ratio; NaN counts as rejection
    in_warmup: torch.Tensor | None = None  # (B,) bool
    trace: torch.Tensor | None = None  # (B,) float

    @property
    def acceptance_probability(self) -> torch.Tensor:
        """(B,) min(1, exp(log_ratio)), 0 where NaN; computed only when asked for."""
        return self.log_ratio.clamp(max=0.0).exp().nan_to_num(nan=0.0)


class Noise:
    """Randomness for a batch whose consecutive row blocks own separate generators.

    Example:
        >>> noise = Noise.seeded(0, rows=4)
        >>> noise.normal(2).shape
        torch.Size([4, 2])

    Each block of `rows[i]` rows draws from `generators[i]`, so a request's samples depend
    only on its seed, wherever its rows sit in a shared batch.
    """

    def __init__(
        self,
        generators: Sequence[torch.Generator],
        rows: Sequence[int],
        device: torch.device | str = "cpu",
    ):
        assert len(generators) == len(rows), "one generator per block of rows"
        assert all(n >= 0 for n in rows), "row counts must be non-negative"
        self.generators = list(generators)
        self.rows = [int(n) for n in rows]
        self.device = torch.device(device)

    @classmethod
    def seeded(cls, seed: int, rows: int, device: torch.device | str = "cpu") -> Noise:
        return cls([make_generator(seed, device)], [rows], device)

    @property
    def batch_size(self) -> int:
        return sum(self.rows)

    def _draw(self, fn: Any, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if len(self.rows) == 1:  # the common case, without the list plumbing
            return fn(
                (self.rows[0], *shape),
                generator=self.generators[0],
                device=self.device,
                dtype=dtype,
            )
        blocks = [
            fn((n, *shape), generator=g, device=self.device, dtype=dtype)
            for g, n in zip(self.generators, self.rows, strict=True)
            if n > 0
        ]
        if not blocks:
            return torch.empty((0, *shape), device=self.device, dtype=dtype)
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def normal(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal draws of shape (B, *shape)."""
        return self._draw(torch.randn, shape, dtype)

    def uniform(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """U(0, 1) draws of shape (B, *shape)."""
        return self._draw(torch.rand, shape, dtype)

    def normal_per_row(self, counts: torch.Tensor, *shape: int) -> torch.Tensor:
        """counts[i] standard normal draws of `shape` for row i, as (B, max count, *shape).

        Each block draws as many per row as its own rows need at most (rows of one block
        belong to one request, so they share the count), and pads with zeros after: a
        row's draws never depend on what other requests in the batch ask for.
        """
        counts = counts.long().cpu()
        width = int(counts.max()) if len(counts) else 0
        blocks, first = [], 0
        for generator, n in zip(self.generators, self.rows, strict=True):
            if n == 0:
                continue
            k = int(counts[first : first + n].max())
            draw = torch.randn((n, k, *shape), generator=generator, device=self.device)
            blocks.append(torch.nn.functional.pad(draw, (0, 0) * len(shape) + (0, width - k)))
            first += n
        if not blocks:
            return torch.empty((0, width, *shape), device=self.device)
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(int(seed))
    return generator


def accept(log_ratio: torch.Tensor, noise: Noise) -> Info:
    """The Metropolis-Hastings test, per row: accept iff U < exp(log_ratio).

    A NaN log ratio (a discriminator that overflowed, a proposal outside the support)
    rejects instead of propagating.
    """
    log_ratio = log_ratio.float()
    # u < exp(r) is exact at both ends: exp overflows to inf (accept), u = 0 never beats
    # a ratio of 0, and NaN compares false (reject).
    return Info(noise.uniform() < log_ratio.exp(), log_ratio)


def where_rows(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Row-wise select: row i of `new` where mask[i], else row i of `old`."""
    return torch.where(mask.view(-1, *([1] * (new.dim() - 1))), new, old)


def select(mask: torch.Tensor, new: S, old: S) -> S:
    """Row-wise select between two states of the same type."""
    return type(old)(*(where_rows(mask, n, o) for n, o in zip(new, old, strict=True)))


def concat(states: Sequence[S]) -> S:
    """Stack several states of one kind into one batch (rows in the given order)."""
    assert states, "need at least one state"
    if len(states) == 1:
        return states[0]
    return type(states[0])(*(torch.cat(fields) for fields in zip(*states, strict=True)))


def take(state: S, index: torch.Tensor | slice) -> S:
    """The rows `index` (a slice, integer indices or a boolean mask) of a state."""
    return type(state)(*(field[index] for field in state))


def put(state: S, mask: torch.Tensor, part: S) -> S:
    """`state` with its rows `mask` replaced by the rows of `part` (inverse of `take`)."""
    index = mask.nonzero().squeeze(1)
    return type(state)(
        *(whole.index_copy(0, index, new) for whole, new in zip(state, part, strict=True))
    )


def split(state: S, rows: Sequence[int]) -> list[S]:
    """Inverse of `concat`: cut a batch into consecutive blocks of `rows` rows."""
    fields = [torch.split(field, list(rows)) for field in state]
    return [type(state)(*parts) for parts in zip(*fields, strict=True)]


def per_row(value: float | torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    """A per-request parameter broadcast to one float per row."""
    return torch.as_tensor(value, dtype=torch.float32, device=device).expand(rows).clone()


class Kernel(NamedTuple):
    """A method's step and how to read its output, with parameters fixed by `build`.

    step(state, noise) -> (state, info) advances every row once.
    output(state) -> (B, *shape) is what each row would return now (never a real point).
    restart(state) -> (state, restarted) lets a chain that never left its real starting
    point start again from its first proposal; None for methods without real starts.
    done(state) -> (B,) bool marks rows that need no more steps in final mode (a drs row
    that accepted, or spent its proposal budget): final-mode drivers step only the other
    rows, until none is left, whatever the step count. None for chains, which run their
    steps.
    """

    step: Any
    output: Any
    restart: Any = None
    done: Any = None


def restart_from_first(state: S, fields: dict[str, str]) -> tuple[S, torch.Tensor]:
    """Rows still at their real start (`state.is_real`) continue from their first proposal.

    `fields` maps each current-state field to the field caching its first-proposal value,
    e.g. {"x": "first_x"}; returns the new state and the restarted rows.
    """
    stuck = state.is_real
    moved = {
        name: where_rows(stuck, getattr(state, first), getattr(state, name))
        for name, first in fields.items()
    }
    return state._replace(is_real=torch.zeros_like(stuck), **moved), stuck


def noise_rows(noise: Noise, mask: torch.Tensor) -> Noise:
    """The Noise of the rows in `mask`, keeping each row's own generator."""
    counts = [int(part.sum()) for part in torch.split(mask.cpu(), noise.rows)]
    return Noise(noise.generators, counts, noise.device)
