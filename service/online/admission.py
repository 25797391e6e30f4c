"""The queue in front of a scheduler group, in Ray Serve's shape.

Blocks of chains wait here until the group's thread admits them between two steps:

- when the group is idle, it blocks for the first block, then waits at most
  `batch_wait_s`, counted from that block's arrival, for more rows (up to
  `max_batch_size`): a burst of small requests shares its first step;
- when the group is busy, everything waiting is admitted at the next step, so a
  newcomer gets rows at once whatever the size of the requests already running (the
  stepping loop shares each step's rows between blocks, service/online/group.py);
- the rows a group holds (waiting plus running) are bounded by `max_queued_rows`; beyond
  it a submission gets QueueFull (503 + Retry-After), never a silent wait;
- a cancelled block is dropped before it runs; a stream block whose client left
  `buffer_events` events unread pauses (`runnable`), and `drained` wakes the group when
  the client reads again.

Every method is called with the queue's own lock; the group thread waits on it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from service.errors import QueueFull
from service.online.chains import ChainBlock


class AdmissionQueue:
    def __init__(
        self,
        max_batch_size: int,
        batch_wait_s: float,
        max_queued_rows: int,
        buffer_events: int,
        idle_s: float,
        queued_rows_gauge: Any,
    ):
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.max_queued_rows, self.buffer_events, self.idle_s = (
            max_queued_rows,
            buffer_events,
            idle_s,
        )
        self._gauge = queued_rows_gauge
        self._cond = threading.Condition()
        self._waiting: deque[ChainBlock] = deque()
        self._waiting_rows = 0
        self.running_rows = 0  # rows admitted and not finished (the group thread sets it)
        self.closed = self._stopping = False

    # Called from the event loop ------------------------------------------------------

    def put(self, blocks: list[ChainBlock]) -> bool:
        """Queue blocks (all or none); False if the group has closed (make a new one)."""
        rows = sum(block.rows for block in blocks)
        with self._cond:
            if self.closed:
                return False
            held = self._waiting_rows + self.running_rows
            if held > 0 and held + rows > self.max_queued_rows:
                raise QueueFull(f"the scheduler is full ({held} rows held); retry shortly")
            for block in blocks:
                block.owner = self
                self._waiting.append(block)
            self._waiting_rows += rows
            self._gauge.set(self._waiting_rows)
            self._cond.notify()
        return True

    def cancel(self, block: ChainBlock) -> None:
        with self._cond:
            block.cancelled = True
            if block in self._waiting:
                self._waiting.remove(block)
                self._waiting_rows -= block.rows
                self._gauge.set(self._waiting_rows)
            self._cond.notify()

    def drained(self, block: ChainBlock) -> None:
        """A stream client read one event of `block`."""
        with self._cond:
            block.buffered -= 1
            if block.buffered == self.buffer_events - 1:
                self._cond.notify()  # the block was paused: let it run again

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    # Called from the group thread ----------------------------------------------------

    def take(self, busy: bool) -> list[ChainBlock] | None:
        """The blocks that join now; None when the group should exit (stopped, or idle
        for `idle_s` with nothing running)."""
        with self._cond:
            if not busy:
                if not self._wait_for_first():
                    self.closed = True
                    return None
                first = self._waiting[0].enqueued_at if self._waiting else 0.0
                while self._waiting_rows < self.max_batch_size and not self._stopping:
                    remaining = first + self.batch_wait_s - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(timeout=remaining)
            if self._stopping:
                self.closed = True
                return None
            taken = list(self._waiting)
            self._waiting.clear()
            self.running_rows += self._waiting_rows
            self._waiting_rows = 0
            self._gauge.set(0)
            return taken

    def _wait_for_first(self) -> bool:
        deadline = time.monotonic() + self.idle_s
        while not self._waiting and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._cond.wait(timeout=remaining)
        return True

    def runnable(self, blocks: list[ChainBlock]) -> list[ChainBlock]:
        """The blocks whose clients keep up; waits (up to a second) when all are paused."""
        with self._cond:
            ready = [block for block in blocks if block.buffered < self.buffer_events]
            if blocks and not ready:  # sleep until a client reads or leaves
                self._cond.wait(timeout=1.0)
            return ready

    def count_emitted(self, block: ChainBlock) -> None:
        """One more event of `block` waits for its client."""
        with self._cond:
            block.buffered += 1

    def release(self, rows: int) -> None:
        """`rows` admitted rows have finished (or failed, or were cancelled)."""
        with self._cond:
            self.running_rows -= rows

    def leftovers(self) -> list[ChainBlock]:
        """Everything still waiting, removed (the group is shutting down)."""
        with self._cond:
            blocks = list(self._waiting)
            self._waiting.clear()
            self._waiting_rows = 0
            return blocks
