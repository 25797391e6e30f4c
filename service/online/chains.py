"""A block of chains: one request's rows as a scheduler group sees them, and how results
come back to the event loop.

A request's randomness comes from its own generators, one per `SEED_BLOCK_ROWS` rows
(`seed_blocks`), so its samples depend on its seed only, never on who shares a batch.
A final-mode request of many rows is cut into several blocks (each can share a batch
with others); a stream request is one block. The group's thread fills a block in; the
event loop awaits `ChainBlock.result()` (final mode) or calls `next_samples()` (stream
mode). Results cross threads with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from samplers import make_generator, take
from samplers.diagnostics import TraceRecorder

# Rows per random stream. Fixed, so a seed's samples never depend on the configuration;
# large, because each extra stream costs a separate draw per step (about 0.1 ms at 2048
# rows, 8 streams: 10% of a small model's step).
SEED_BLOCK_ROWS = 4096
_END = object()  # stream sentinel


def seed_blocks(seed: int, rows: int, first_block: int, device: torch.device):
    """Generators and row counts for `rows` rows starting at block `first_block` of a request.

    Block 0 is seeded with `seed` itself (so a small request matches Noise.seeded(seed, n));
    block b > 0 with a seed derived from (seed, b).
    """
    generators, counts = [], []
    for index in range(-(-rows // SEED_BLOCK_ROWS)):
        block = first_block + index
        block_seed = (
            seed
            if block == 0
            else int(np.random.SeedSequence([seed, block]).generate_state(1, np.uint64)[0] >> 1)
        )
        generators.append(make_generator(block_seed, device))
        counts.append(min(SEED_BLOCK_ROWS, rows - index * SEED_BLOCK_ROWS))
    return generators, counts


@dataclass
class BlockSpec:
    rows: int  # chains
    steps: int  # steps per round (final: + one restart round for flagged rows)
    generators: list[torch.Generator]
    block_rows: list[int]
    options: dict[str, Any] = field(default_factory=dict)  # method options for the plan
    stream: bool = False
    thin: int = 1  # stream: emit on every thin-th step
    target: int = 0  # stream: stop after this many samples
    trace: bool = False  # record the chains' trace for R-hat and ESS (a request's first block)


class StreamDone(Exception):
    """A stream block has emitted everything it will."""


class BlockOutcome(NamedTuple):
    samples: torch.Tensor | None  # final mode: (rows, *shape) on the CPU
    proposals: int  # points evaluated (an i-SIR step proposes particles - 1 of them)
    accepted: int  # chain steps that moved (drs: accepted trials)
    restarted: int
    fallback: int  # rows that return a fallback (drs: no accepted proposal at all)
    diagnostics: dict[str, Any] | None = None  # TraceRecorder.summary() of a traced block
    row_steps: int = 0  # chain steps taken (drs: trials), what acceptance counts against


class BlockOwner(Protocol):
    """The admission queue holding a block: told when a block is cancelled or read."""

    def cancel(self, block: ChainBlock) -> None: ...

    def drained(self, block: ChainBlock) -> None: ...


class ChainBlock:
    """One block of a request's chains. Await `result()` (final) or `next_samples()`."""

    def __init__(self, spec: BlockSpec, loop: asyncio.AbstractEventLoop):
        self.spec, self.loop = spec, loop
        self.future: asyncio.Future[BlockOutcome] = loop.create_future()
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.enqueued_at = time.monotonic()
        self.owner: BlockOwner | None = None
        self.cancelled = False  # these two change under the owner's lock
        self.buffered = 0
        # Group-thread state:
        self.rows, self.block_rows = spec.rows, list(spec.block_rows)
        self.state: Any = None
        self.steps_done = self.phase = self.proposals = self.accepted = self.emitted = 0
        self.row_steps = 0  # chain steps taken, all rows
        self.points_per_step = 1  # set by the group from the method's table
        self.restarted = 0
        self.last_stepped = -1  # the group's step counter when this block last stepped
        # Final mode may step a subset of the block's rows (the restart round, drs rows
        # not done yet): `kept` is then the whole block's state, `index` the rows stepping.
        self.kept: Any = None
        self.index: torch.Tensor | None = None
        self.recorder = TraceRecorder() if spec.trace else None
        self.trace_lock = threading.Lock()  # the group records, the event loop summarises

    async def result(self) -> BlockOutcome:
        try:
            return await asyncio.shield(self.future)
        except asyncio.CancelledError:
            self.cancel()
            raise

    async def next_samples(self, timeout: float | None = None) -> torch.Tensor | None:
        """The next batch of newly accepted samples (stream blocks), None after `timeout` s.

        Raises StreamDone when the block has finished, or the block's error if it failed.
        """
        try:
            item = await asyncio.wait_for(self.events.get(), timeout)
        except TimeoutError:
            return None
        if item is _END:
            self.events.put_nowait(_END)  # later calls end too
            self.future.result()  # raises the failure, if any
            raise StreamDone
        self.owner.drained(self)
        return item

    def cancel(self) -> None:
        if self.owner is not None:
            self.owner.cancel(self)

    def outcome(self, samples: torch.Tensor | None, fallback: int = 0) -> BlockOutcome:
        return BlockOutcome(
            samples, self.proposals, self.accepted, self.restarted, fallback,
            self.diagnostics(), self.row_steps,
        )  # fmt: skip

    def diagnostics(self) -> dict[str, Any] | None:
        if self.recorder is None:
            return None
        with self.trace_lock:
            return self.recorder.summary()

    # Final mode: stepping a subset of the rows -----------------------------------------

    def narrow(self, state: Any, mask: torch.Tensor) -> None:
        """Step only the rows `mask` of `state` (the rows now stepping) from here on."""
        whole = self.widen(state)
        current = self.index if self.index is not None else torch.arange(len(mask))
        self.kept, self.index = whole, current.to(mask.device)[mask]
        self.state = take(state, mask)
        self.block_rows = [int(part.sum()) for part in torch.split(mask.cpu(), self.block_rows)]
        self.rows = len(self.index)

    def widen(self, state: Any) -> Any:
        """The whole block's state, with the stepping rows' `state` put back in place."""
        if self.index is None:
            return state
        return type(self.kept)(
            *(whole.index_copy(0, self.index, part)
              for whole, part in zip(self.kept, state, strict=True))
        )  # fmt: skip


def call(block: ChainBlock, fn: Callable[..., Any], *args: Any) -> None:
    """Run `fn(*args)` on the block's event loop, from the group's thread."""
    try:
        block.loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop has closed: nobody is waiting any more
        pass


def settle(block: ChainBlock, outcome: BlockOutcome | None, error: BaseException | None) -> None:
    def settle_now() -> None:
        if not block.future.done():
            block.future.set_exception(error) if error else block.future.set_result(outcome)
            block.future.exception() if error else None  # retrieved: no "never retrieved" log
        block.events.put_nowait(_END)

    call(block, settle_now)
