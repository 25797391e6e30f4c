"""The worker: consumes work messages and runs them on this process's engine.

One `Worker` per process (`imh worker`; in embedded mode the API process runs one for
batch jobs). It reads the two work streams with separate slot limits (online requests
are many and light on the queue, job shards few and long), so a large job never starves
online sampling. Once a second it refreshes the messages it runs (so no one reclaims
them), cancels those nobody wants any more (a stream client gone past its lease, a
cancelled job), and writes its heartbeat. Every `claim_idle_s / 2` it reclaims messages
of workers that stopped; a message past `max_deliveries` is dead-lettered and its
request or job fails with the reason.

Online requests: results go to the request's event stream. Final mode writes all
samples and the `done` event in one transaction; stream mode writes events as they come,
each with the running sample total, so a redelivered stream request (same seed, same
samples) skips what its first run already wrote: the client sees every sample once.
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
from typing import Any

import numpy as np
from redis.exceptions import RedisError

from service.batch.schemas import TERMINAL
from service.batch.shards import ShardRunner
from service.batch.store import JobStore
from service.distributed.codec import pack
from service.distributed.connection import Broker, retrying
from service.distributed.keys import JOBS, ONLINE, STREAMS
from service.distributed.queue import Message, WorkQueue
from service.errors import EngineFailure, InvalidRequest, ServiceError, status_of
from service.metrics import Metrics
from service.online.schemas import SampleCreate
from service.online.service import SamplingService
from service.settings import Settings

log = logging.getLogger("imh.worker")
REQUEST_TTL_S = 3600  # an online request's event stream outlives its end by this much
FINAL_CHUNK_BYTES = 4 * 2**20  # final-mode samples per stream entry
GIVE_UP_S = 60.0  # how long a result write waits for Redis before leaving it to redelivery


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
        sampling: SamplingService,
        runner: ShardRunner,
        store: JobStore,
        name: str | None = None,
    ):
        self.broker, self.redis, self.keys = broker, broker.redis, broker.keys
        self.settings, self.metrics, self.sampling = settings, metrics, sampling
        self.runner, self.store = runner, store
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self.queue = WorkQueue(broker, self.name, settings.claim_idle_s, settings.max_deliveries)
        self.slots = {ONLINE: settings.worker_slots, JOBS: settings.worker_shard_slots}
        self.running: dict[str, _Running] = {}
        self._freed = {stream: asyncio.Event() for stream in STREAMS}
        self._stopping = asyncio.Event()
        self.redis_ok = False

    # Lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until cancelled or `stop()`."""
        loops = [self._consume(ONLINE), self._consume(JOBS), self._reclaim(), self._keepalive()]
        if not self.broker.embedded:  # the API process of embedded mode has the models
            loops.append(self._follow_models())
        await asyncio.gather(*loops)

    async def stop(self, drain_s: float = 10.0) -> None:
        """Stop reading; let running work finish for `drain_s`, then give the rest back."""
        self._stopping.set()
        for event in self._freed.values():
            event.set()
        tasks = [running.task for running in self.running.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=drain_s)
        for task in tasks:
            task.cancel()  # not acknowledged: another worker reclaims it
        with contextlib.suppress(RedisError, OSError):
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
                if not self.redis_ok:
                    log.info("Redis is reachable again")
                self.redis_ok = True
            except (RedisError, OSError) as error:
                self._redis_down(error)
            await asyncio.sleep(min(1.0, self.settings.heartbeat_s, self.settings.claim_idle_s / 3))

    async def _follow_models(self) -> None:
        """Load or drop models the API announces (uploads land in the shared model store)."""
        registry, store = self.sampling.registry, self.settings.model_store.resolve()
        while not self._stopping.is_set():
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.keys.models)
                    async for message in pubsub.listen():
                        if message["type"] != "message":
                            continue
                        change = json.loads(message["data"])
                        await asyncio.to_thread(_apply_model_change, registry, store, change)
            except (RedisError, OSError) as error:
                self._redis_down(error)
                await asyncio.sleep(1.0)

    async def _heartbeat(self) -> None:
        info = {
            "name": self.name, "pid": os.getpid(), "host": socket.gethostname(),
            "device": str(self.sampling.registry.device), "at": time.time(),
            "running": {stream: self.busy(stream) for stream in STREAMS},
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
        running = list(self.running.values())
        if not running:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for r in running:
                fields = r.message.fields
                if fields["kind"] == b"sample":
                    pipe.exists(self.keys.lease(fields["id"].decode()))
                else:
                    pipe.hget(self.keys.job(fields["job"].decode()), "state")
            answers = await pipe.execute()
        for r, answer in zip(running, answers, strict=True):
            wanted = bool(answer) if r.message.fields["kind"] == b"sample" else (
                answer is not None and answer.decode() not in TERMINAL
            )  # fmt: skip
            if not wanted and not r.task.done():
                r.unwanted = True
                r.task.cancel()

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
            kind = message.fields.get("kind", b"").decode()
            if kind == "sample":
                await self._sample(message)
            elif kind == "shard":
                await self._shard(message)
            else:
                log.error("dropping a message of unknown kind %r: %s", kind, message.id)
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

    async def _shard(self, message: Message) -> None:
        job_id, shard = message.text("job"), int(message.text("shard"))
        try:
            job_type, outcome = await self.runner.run(job_id, shard)
        except ServiceError as error:
            job_type, outcome, reason = "unknown", "failed", error.message
            log.warning("job %s shard %d failed: %s", job_id, shard, reason)
            await retrying(lambda: self.store.fail(job_id, reason), GIVE_UP_S, "failing the job")
        self.metrics.job_shards.labels(job_type, outcome).inc()

    async def _sample(self, message: Message) -> None:
        request_id, mode = message.text("id"), message.text("mode")
        key = self.keys.request(request_id)
        if not await self.redis.exists(self.keys.lease(request_id)):
            return  # the client left before the work started
        written = await self._already_written(key)
        if written is None:
            return  # a previous delivery finished it
        try:
            body = SampleCreate.model_validate_json(message.fields["body"])
            resolved = await self.sampling.resolve(body, stream=mode == "stream")
            if mode == "final":
                samples, stats = await self.sampling.sample(resolved)
                await self._write_final(key, samples.numpy(), stats)
            else:
                await self._write_stream(key, resolved, skip=written)
        except ServiceError as error:
            await self._write(key, [_entry("error", _error_data(error), written)])
        except Exception as error:  # noqa: BLE001 - the client must hear of it, and no one else can
            if message.deliveries < self.settings.max_deliveries:
                raise
            failure = EngineFailure(f"{type(error).__name__}: {error}")
            await self._write(key, [_entry("error", _error_data(failure), written)])

    async def _already_written(self, key: str) -> int | None:
        """Samples a previous delivery wrote to this stream; None if it ended the stream."""
        last = await self.redis.xrevrange(key, count=1)
        if not last:
            return 0
        fields = last[0][1]
        if fields[b"event"] in (b"done", b"error"):
            return None
        return int(fields.get(b"total", 0))

    async def _write_stream(self, key: str, resolved: Any, skip: int) -> None:
        total = 0
        events = self.sampling.events(resolved, encode=False)
        async with contextlib.aclosing(events):
            async for name, data in events:
                if name == "samples":
                    fresh = data[max(skip - total, 0) :]
                    total += len(data)
                    if len(fresh):
                        await self._write(key, [_entry("samples", None, total, fresh.numpy())])
                elif name == "error":
                    await self._write(key, [_entry("error", {"status": 500, **data}, total)])
                elif total >= skip:  # metrics and done
                    await self._write(key, [_entry(name, data, total)])

    async def _write_final(self, key: str, samples: np.ndarray, stats: dict) -> None:
        per_row = max(samples[:1].nbytes, 1)
        rows = max(FINAL_CHUNK_BYTES // per_row, 1)
        entries = [
            _entry("samples", None, min(first + rows, len(samples)), samples[first : first + rows])
            for first in range(0, len(samples), rows)
        ]
        await self._write(key, [*entries, _entry("done", stats, len(samples))])

    async def _write(self, key: str, entries: list[dict[str, Any]]) -> None:
        async def write() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                for fields in entries:
                    pipe.xadd(key, fields)
                pipe.expire(key, REQUEST_TTL_S)
                await pipe.execute()

        await retrying(write, GIVE_UP_S, "writing results", self._stopping)

    async def _dead_letter(self, message: Message) -> None:
        reason = f"failed on {message.deliveries - 1} deliveries (dead-lettered)"
        self.metrics.dead_letters.labels(message.stream).inc()
        log.error("dead-lettering %s %s: %s", message.stream, message.id, reason)
        try:
            if message.fields.get("kind") == b"shard":
                await self.store.fail(
                    message.text("job"), f"shard {message.text('shard')} {reason}"
                )
            elif message.fields.get("kind") == b"sample":
                key = self.keys.request(message.text("id"))
                written = await self._already_written(key)
                if written is not None:
                    failure = EngineFailure(f"the request {reason}")
                    await self._write(key, [_entry("error", _error_data(failure), written)])
            await self.queue.dead_letter(message, reason)
        except (RedisError, OSError) as error:
            self._redis_down(error)

    def _redis_down(self, error: Exception) -> None:
        if self.redis_ok:
            log.warning("Redis is unreachable: %s", error)
        self.redis_ok = False


def _apply_model_change(registry: Any, store: Any, change: dict[str, str]) -> None:
    name, version = change["name"], change["version"]
    try:
        if change["op"] == "install":
            registry.load_one(store, name, version, "store")
        else:
            registry.remove(name, version)
        log.info("model %s:%s: %s", name, version, change["op"])
    except ServiceError as error:  # not in this worker's store, or already gone
        log.warning("model %s:%s: cannot %s here: %s", name, version, change["op"], error.message)
    except Exception as error:  # noqa: BLE001 - a bad model must not stop the worker
        log.error("model %s:%s: cannot %s here: %s", name, version, change["op"], error)


def _entry(name: str, data: Any, total: int, array: np.ndarray | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {"event": name, "total": total}
    if data is not None:
        fields["data"] = json.dumps(data, allow_nan=False)
    if array is not None:
        fields.update(pack(array))
    return fields


def _error_data(error: ServiceError) -> dict[str, Any]:
    data: dict[str, Any] = {"status": status_of(error), "detail": error.message}
    if isinstance(error, InvalidRequest):
        data["field"] = list(error.field)
    return data
