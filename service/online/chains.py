"""Engine jobs: one request's block of chains as the engine sees it, and how results come back.

A request's randomness comes from its own generators, one per `SEED_BLOCK_ROWS` rows
(`seed_blocks`), so its samples depend on its seed only, never on who shares a batch.
The engine's thread fills a job in; the event loop awaits `Job.result()` (final mode) or
calls `Job.next_samples()` (stream mode). Results cross threads with
`call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from samplers import make_generator

if TYPE_CHECKING:
    from service.online.engine import Group

# Rows per random stream. Fixed, so a seed's samples never depend on the configuration;
# large, because each extra stream costs a separate draw per step (about 0.1 ms at 2048
# rows, 8 streams: 10% of a small model's step). A request's block always steps as one,
# even when IMH_MAX_BATCH_SIZE is smaller.
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
class JobSpec:
    rows: int  # chains
    steps: int  # steps per round (final: + one restart round for flagged rows)
    generators: list[torch.Generator]
    block_rows: list[int]
    options: dict[str, Any] = field(default_factory=dict)  # method options for the plan
    stream: bool = False
    thin: int = 1  # stream: emit on every thin-th step
    target: int = 0  # stream: stop after this many samples


class StreamDone(Exception):
    """A stream job has emitted everything it will."""


class JobOutcome(NamedTuple):
    samples: torch.Tensor | None  # final mode: (rows, *shape) on the CPU
    proposals: int
    accepted: int
    restarted: int
    fallback: int  # rows that return a fallback (drs: no accepted proposal at all)


class Job:
    """One block of a request's chains. Await `result()` (final) or iterate `stream()`."""

    def __init__(self, spec: JobSpec, loop: asyncio.AbstractEventLoop):
        self.spec, self.loop = spec, loop
        self.future: asyncio.Future[JobOutcome] = loop.create_future()
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.enqueued_at = time.monotonic()
        self.group: Group | None = None
        self.cancelled = False  # these two change under the group's lock
        self.buffered = 0
        # Group-thread state:
        self.rows, self.block_rows = spec.rows, list(spec.block_rows)
        self.state: Any = None
        self.steps_done = self.phase = self.proposals = self.accepted = self.emitted = 0
        self.restarted = 0
        self.kept: Any = None  # final phase 1: the full state the restarted rows return to
        self.stuck_index: torch.Tensor | None = None

    async def result(self) -> JobOutcome:
        try:
            return await asyncio.shield(self.future)
        except asyncio.CancelledError:
            self.cancel()
            raise

    async def next_samples(self, timeout: float | None = None) -> torch.Tensor | None:
        """The next batch of newly accepted samples (stream jobs), None after `timeout` s.

        Raises StreamDone when the job has finished, or the job's error if it failed.
        """
        try:
            item = await asyncio.wait_for(self.events.get(), timeout)
        except TimeoutError:
            return None
        if item is _END:
            self.events.put_nowait(_END)  # later calls end too
            self.future.result()  # raises the failure, if any
            raise StreamDone
        self.group.drained(self)
        return item

    def cancel(self) -> None:
        if self.group is not None:
            self.group.cancel(self)

    def outcome(self, samples: torch.Tensor | None, fallback: int = 0) -> JobOutcome:
        return JobOutcome(samples, self.proposals, self.accepted, self.restarted, fallback)


def call(job: Job, fn: Callable[..., Any], *args: Any) -> None:
    try:
        job.loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop has closed: nobody is waiting any more
        pass


def settle(job: Job, outcome: JobOutcome | None, error: BaseException | None) -> None:
    def settle_now() -> None:
        if not job.future.done():
            job.future.set_exception(error) if error else job.future.set_result(outcome)
            job.future.exception() if error else None  # retrieved: no "never retrieved" log
        job.events.put_nowait(_END)

    call(job, settle_now)
