"""The batching engine: one scheduler group (a thread) per (generator, discriminator,
method, calibration, proposal, lane) key.

Every request of a group steps in one batch with the others (service/online/group.py),
admitted by the group's queue (service/online/admission.py). Requests of at most
`interactive_rows` chains run in the "interactive" lane and larger ones (and job
shards) in the "bulk" lane: two groups, two threads, so a small request never waits for
the steps of a large one.

Example:
    >>> engine = Engine(EngineConfig(max_batch_size=4096), metrics)
    >>> [block] = engine.submit(key, ("toy25", "imh"), make_plan, [spec], loop)
    >>> outcome = await block.result()
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from service.online.chains import BlockSpec, ChainBlock
from service.online.group import Group, Plan


@dataclass
class EngineConfig:
    max_batch_size: int = 4096  # rows of different requests stepped together
    batch_wait_s: float = 0.002  # an idle group waits this long for more rows
    max_queued_rows: int = 131072  # rows a group holds, waiting or running; beyond: QueueFull
    buffer_events: int = 64  # unread stream events before a stream's chains pause
    idle_s: float = 60.0  # an idle group's thread exits after this
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class Engine:
    """Groups by key; `submit` routes blocks to their group, creating it on first use."""

    def __init__(self, config: EngineConfig, metrics: Any):
        self.config, self.metrics = config, metrics
        self._groups: dict[Hashable, Group] = {}
        self._lock = threading.Lock()

    def submit(
        self,
        key: Hashable,
        labels: tuple[str, str],
        plan_factory: Callable[[], Plan],
        specs: list[BlockSpec],
        loop: asyncio.AbstractEventLoop,
    ) -> list[ChainBlock]:
        """Queue blocks (all or none); raises QueueFull when the group is full.

        `plan_factory` runs once, in the group's thread, when the group starts.
        """
        blocks = [ChainBlock(spec, loop) for spec in specs]
        while True:
            with self._lock:
                group = self._groups.get(key)
                if group is None or group.queue.closed:
                    group = self._groups[key] = Group(
                        self.config, self.metrics, key, labels, plan_factory, self._forget
                    )
            if group.queue.put(blocks):
                return blocks

    def _forget(self, group: Group) -> None:
        with self._lock:
            if self._groups.get(group.key) is group:
                del self._groups[group.key]

    def close(self) -> None:
        with self._lock:
            groups = list(self._groups.values())
            self._groups.clear()
        for group in groups:
            group.queue.stop()
        for group in groups:
            group.thread.join(timeout=10)

    @property
    def groups(self) -> int:
        """Scheduler threads running now."""
        with self._lock:
            return sum(not group.queue.closed for group in self._groups.values())
