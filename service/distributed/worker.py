"""The worker loop: consumes work messages and hands each to the handler of its kind.

One `Worker` per process (`imh worker`; in embedded mode the API process runs one for
batch jobs). What a message means is the handlers' business (service/online/worker.py
runs "sample" messages, service/batch/shards.py "shard" messages); this loop owns the
plumbing every kind shares:

- it reads the two work streams with separate slot limits (online requests are many and
  light, job shards few and long), so a large job never takes the slots of online work;
- once a second it refreshes the messages it runs (so no one reclaims them), asks each
  handler which of its running messages are still wanted (a stream client gone past its
  lease, a cancelled job) and cancels the others, and writes its heartbeat;
- every `claim_idle_s / 2` it reclaims messages of workers that stopped; a message past
  `max_deliveries` is dead-lettered and its handler tells the owner why;
- `stop(drain_s)` (SIGTERM) stops reading, lets running work finish for `drain_s`, then
  hands the rest back at once (their idle time is set past the reclaim threshold, so
  another worker takes them over on its next reclaim) and exits.

A handler that raises leaves its message unacknowledged: redelivery counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Protocol

from redis.exceptions import RedisError

from service.distributed.connection import Broker, retrying
from service.distributed.keys import JOBS, ONLINE, STREAMS
from service.distributed.queue import Message, WorkQueue
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("imh.worker")
GIVE_UP_S = 60.0  # how long an acknowledgement waits for Redis before leaving it to redelivery


class WorkHandler(Protocol):
    """Runs the messages of one kind ("sample", "shard") from one work stream."""

    kind: str
    stream: str

    async def handle(self, message: Message) -> None: ...

    async def wanted(self, messages: list[Message]) -> list[bool]:
        """Whether someone still wants each running message's result."""
        ...

    async def give_up(self, message: Message, reason: str) -> None:
        """Tell the message's owner (a request, a job) that it was dead-lettered."""
        ...


@dataclass
class _Running:
    message: Message
    task: asyncio.Task
    unwanted: bool = False  # cancelled because nobody wants the result: acknowledge


class Worker:
    def __init__(
        self,
        broker: Broker,
        settings: Settings,
        metrics: Metrics,
        handlers: list[WorkHandler],
        *,
        name: str | None = None,
        device: str = "cpu",
    ):
        self.broker, self.redis, self.keys = broker, broker.redis, broker.keys
        self.settings, self.metrics, self.device = settings, metrics, device
        self.handlers = {handler.kind: handler for handler in handlers}
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self.queue = WorkQueue(broker, self.name, settings.claim_idle_s, settings.max_deliveries)
        self.slots = {ONLINE: settings.worker_slots, JOBS: settings.worker_shard_slots}
        self.running: dict[str, _Running] = {}
        self._freed = {stream: asyncio.Event() for stream in STREAMS}
        self._stopping = asyncio.Event()
        self.redis_ok: bool | None = None  # None until the first answer

    # Lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until cancelled or `stop()`."""
        streams = {handler.stream for handler in self.handlers.values()}
        loops = [self._consume(stream) for stream in STREAMS if stream in streams]
        loops += [self._reclaim(), self._keepalive()]
        await asyncio.gather(*loops)

    async def stop(self, drain_s: float = 10.0) -> None:
        """Stop reading; let running work finish for `drain_s`, then hand the rest back."""
        self._stopping.set()
        for event in self._freed.values():
            event.set()
        tasks = [running.task for running in self.running.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=drain_s)
        unfinished = [r.message for r in self.running.values() if not r.task.done()]
        for running in list(self.running.values()):
            running.task.cancel()  # not acknowledged: handed back below
        with contextlib.suppress(RedisError, OSError):
            for stream in STREAMS:
                ids = [m.id for m in unfinished if m.stream == stream]
                await self.queue.release(stream, ids)
            if unfinished:
                log.warning("handed %d running messages back for other workers", len(unfinished))
            await self.redis.delete(self.keys.worker(self.name))
            await self.redis.srem(self.keys.workers, self.name)

    def busy(self, stream: str) -> int:
        return sum(r.message.stream == stream for r in self.running.values())

    # Loops ---------------------------------------------------------------------------

    async def _consume(self, stream: str) -> None:
        pause = 0.1
        while not self._stopping.is_set():
            free = self.slots[stream] - self.busy(stream)
            if free <= 0:
                self._freed[stream].clear()
                await self._freed[stream].wait()
                continue
            try:
                messages = await self.queue.read(stream, free)
                pause = 0.1
            except (RedisError, OSError) as error:
                self._redis_down(error)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
                continue
            for message in messages:
                self._start(message)

    async def _reclaim(self) -> None:
        interval = max(self.settings.claim_idle_s / 2, 0.2)
        while not self._stopping.is_set():
            await asyncio.sleep(interval)
            for stream in STREAMS:
                free = self.slots[stream] - self.busy(stream)
                if free <= 0 or self._stopping.is_set():
                    continue
                try:
                    messages = await self.queue.reclaim(stream, free)
                except (RedisError, OSError) as error:
                    self._redis_down(error)
                    continue
                for message in messages:
                    self.metrics.redeliveries.labels(stream).inc()
                    log.warning(
                        "reclaimed %s %s (delivery %d)", stream, message.id, message.deliveries
                    )
                    if message.deliveries > self.settings.max_deliveries:
                        await self._dead_letter(message)
                    else:
                        self._start(message)

    async def _keepalive(self) -> None:
        """Once a second: refresh running messages, cancel unwanted ones, heartbeat."""
        last_beat = 0.0
        while not self._stopping.is_set():
            try:
                for stream in STREAMS:
                    ids = [
                        r.message.id for r in self.running.values() if r.message.stream == stream
                    ]
                    await self.queue.refresh(stream, ids)
                await self._cancel_unwanted()
                if time.monotonic() - last_beat >= self.settings.heartbeat_s:
                    await self._heartbeat()
                    last_beat = time.monotonic()
                if self.redis_ok is False:
                    log.info("Redis is reachable again")
                self.redis_ok = True
            except (RedisError, OSError) as error:
                self._redis_down(error)
            await asyncio.sleep(min(1.0, self.settings.heartbeat_s, self.settings.claim_idle_s / 3))

    async def _heartbeat(self) -> None:
        info = {
            "name": self.name, "pid": os.getpid(), "host": socket.gethostname(),
            "device": self.device, "at": time.time(),
            "running": {stream: self.busy(stream) for stream in STREAMS},
            "engine": self.metrics.engine_totals(),  # for the API's summary
        }  # fmt: skip
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.worker(self.name), json.dumps(info),
                     px=int(self.settings.heartbeat_s * 3000))  # fmt: skip
            pipe.sadd(self.keys.workers, self.name)
            await pipe.execute()
        self.metrics.worker_heartbeats.inc()
        for stream in STREAMS:
            self.metrics.worker_inflight.labels(stream).set(self.busy(stream))

    async def _cancel_unwanted(self) -> None:
        by_kind: dict[str, list[_Running]] = {}
        for running in self.running.values():
            by_kind.setdefault(running.message.kind, []).append(running)
        for kind, runnings in by_kind.items():
            answers = await self.handlers[kind].wanted([r.message for r in runnings])
            for running, wanted in zip(runnings, answers, strict=True):
                if not wanted and not running.task.done():
                    running.unwanted = True
                    running.task.cancel()

    # One message ---------------------------------------------------------------------

    def _start(self, message: Message) -> None:
        if message.id in self.running:  # reclaimed from ourselves while still running
            return
        task = asyncio.create_task(self._handle(message), name=f"imh-{message.stream}-{message.id}")
        self.running[message.id] = _Running(message, task)

    async def _handle(self, message: Message) -> None:
        running = self.running[message.id]
        acknowledge = True
        try:
            handler = self.handlers.get(message.kind)
            if handler is None:
                log.error("dropping a message of unknown kind %r: %s", message.kind, message.id)
            else:
                await handler.handle(message)
        except asyncio.CancelledError:
            acknowledge = running.unwanted  # shutting down: leave it for another worker
            if not running.unwanted:
                raise
        except Exception:  # noqa: BLE001 - leave it unacknowledged: redelivery counts it
            log.exception("work message %s failed; it will be redelivered", message.id)
            acknowledge = False
        finally:
            self.running.pop(message.id, None)
            self._freed[message.stream].set()
            if acknowledge:
                await self._ack(message)

    async def _ack(self, message: Message) -> None:
        try:
            await retrying(lambda: self.queue.ack(message), GIVE_UP_S, "acknowledging")
        except RedisError:
            log.warning("could not acknowledge %s; it will be redelivered", message.id)

    async def _dead_letter(self, message: Message) -> None:
        reason = f"failed on {message.deliveries - 1} deliveries (dead-lettered)"
        self.metrics.dead_letters.labels(message.stream).inc()
        log.error("dead-lettering %s %s: %s", message.stream, message.id, reason)
        try:
            handler = self.handlers.get(message.kind)
            if handler is not None:
                await handler.give_up(message, reason)
            await self.queue.dead_letter(message, reason)
        except (RedisError, OSError) as error:
            self._redis_down(error)

    def _redis_down(self, error: Exception) -> None:
        if self.redis_ok is not False:
            log.warning("Redis is unreachable: %s", error)
        self.redis_ok = False
