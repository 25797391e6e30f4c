"""What runs the models, and its life: the start-up and shutdown that `imh serve` and
`imh worker` share.

A `Runtime` holds the registry, the engine, the sampling service, the Redis (or
in-process) broker with its job store, and the worker loop where this process has one:

| process                  | backend of the routes | worker loop runs              |
|--------------------------|-----------------------|-------------------------------|
| `imh serve`, embedded    | SamplingService       | job shards (in-process store) |
| `imh serve`, distributed | RemoteSampling        | none (workers do the work)    |
| `imh worker`             | (no routes)           | online requests and shards    |

`start()` returns at once: models load in the background (so probes answer during a
long load), then the worker loop starts once Redis answers. `stop(drain_s)` lets the
worker finish or hand back its work, then closes the engine and the connection.

Example:
    >>> runtime = Runtime(Settings(), role="api")
    >>> await runtime.start(); ...; await runtime.stop(drain_s=2)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal

import torch
from redis.exceptions import RedisError

from service.batch.shards import ShardRunner
from service.batch.store import JobStore
from service.distributed.connection import Broker, Health
from service.distributed.worker import Worker
from service.errors import ServiceError
from service.metrics import Metrics
from service.models.registry import ZOO_STORE, Registry
from service.online.backend import SamplingBackend
from service.online.engine import Engine, EngineConfig
from service.online.remote import RemoteSampling
from service.online.service import SamplingService
from service.online.worker import OnlineWork
from service.settings import Settings

log = logging.getLogger("imh.runtime")


class Runtime:
    def __init__(self, settings: Settings, role: Literal["api", "worker"]):
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)  # process-wide, like the setting
        self.settings, self.role = settings, role
        self.distributed = settings.redis_url is not None
        self.metrics = Metrics()
        device = torch.device(settings.device)
        self.registry = Registry(device, compile=settings.compile)
        if role == "worker":
            self.registry.shared_store = settings.model_store.resolve()
        self.engine = Engine(
            EngineConfig(
                max_batch_size=settings.max_batch_size,
                batch_wait_s=settings.batch_wait_s,
                max_queued_rows=settings.max_queued_rows,
                buffer_events=settings.stream_buffer_events,
                idle_s=settings.group_idle_s,
                device=device,
            ),
            self.metrics,
        )
        self.sampling = SamplingService(self.registry, self.engine, settings, self.metrics)
        self.broker = Broker.connect(settings.redis_url, settings.redis_prefix)
        self.health = Health(self.broker)
        self.store = JobStore(self.broker, settings.job_ttl_s, settings.job_result_dir)
        self.backend: SamplingBackend = self.sampling
        if role == "api" and self.distributed:
            self.backend = RemoteSampling(self.sampling, self.broker, self.health, settings)
        self.worker = self._worker(device) if role == "worker" or not self.distributed else None
        if not self.distributed:  # everything is in this process: always reachable
            self.health.redis_up, self.health.workers, self.health.error = True, 1, None
        self.ready = False
        self.startup_error: str | None = None
        self.origin = secrets.token_hex(6)  # tells this process's announcements apart
        self._tasks: set[asyncio.Task] = set()

    def _worker(self, device: torch.device) -> Worker:
        shards = ShardRunner(
            self.store, self.sampling, self.registry, self.metrics,
            self.settings.model_store.resolve(), self.announce_model,
        )  # fmt: skip
        if self.role == "api":  # embedded: batch jobs only; online requests run in place
            return Worker(self.broker, self.settings, self.metrics, [shards], name="embedded")
        online = OnlineWork(self.broker, self.sampling, self.settings.max_deliveries)
        return Worker(
            self.broker, self.settings, self.metrics, [online, shards], device=str(device)
        )

    # Life ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.spawn(self._start())
        if self.distributed:
            self.spawn(self.broker.follow_models(self._apply_model_change))
            if self.role == "api":
                self.spawn(self.health.run())

    async def announce_model(self, op: str, name: str, version: str) -> None:
        """Distributed mode: every process that shares IMH_MODEL_STORE loads (or drops)
        the version too. A lost announcement is not fatal: a worker loads a version it
        is asked for from the shared store."""
        if not self.distributed:
            return
        try:
            await self.broker.announce_model(op, name, version, self.origin)
        except (RedisError, OSError) as error:
            log.warning("could not announce %s of %s:%s: %s", op, name, version, error)

    async def stop(self, drain_s: float) -> None:
        if self.worker is not None:
            await self.worker.stop(drain_s=drain_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.engine.close)
        with contextlib.suppress(Exception):
            await self.broker.close()

    def lifespan(self, drain_s: float) -> Callable[[Any], AbstractAsyncContextManager[None]]:
        """An ASGI app's lifespan: start with the app, stop (draining `drain_s`) with it."""

        @asynccontextmanager
        async def run(app: Any) -> AsyncIterator[None]:
            await self.start()
            try:
                yield
            finally:
                await self.stop(drain_s=drain_s)

        return run

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` in the background until `stop()`."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def unavailable(self, need_worker: bool) -> str | None:
        """Why work cannot be taken now (None: it can)."""
        if not self.ready:
            return self.startup_error or "models are still loading; retry shortly"
        if not self.health.redis_up:
            return self.health.error or "Redis is unreachable"
        if need_worker and self.health.workers == 0:
            return "no worker is available; start `imh worker` processes"
        return None

    async def _start(self) -> None:
        try:
            await self._load_models()
        except Exception as error:  # noqa: BLE001 - report on /readyz rather than die silently
            self.startup_error = f"loading models failed: {error}"
            log.exception("loading models failed")
            return
        if self.worker is not None:
            await self._wait_for_redis()
            self.spawn(self.worker.run())
            if self.role == "worker":
                log.info("worker %s consuming", self.worker.name)
        self.ready = True

    async def _load_models(self) -> None:
        """The zoo (unless IMH_ZOO=0) and IMH_MODEL_STORE, off the event loop."""
        started, settings = time.monotonic(), self.settings
        if settings.zoo:
            await asyncio.to_thread(self.registry.load_store, ZOO_STORE, "zoo")
        await asyncio.to_thread(self.registry.load_store, settings.model_store.resolve(), "store")
        log.info(
            "%d models loaded in %.1fs, %d skipped",
            len(self.registry.all()), time.monotonic() - started, len(self.registry.load_errors),
        )  # fmt: skip

    async def _wait_for_redis(self) -> None:
        pause = 0.2
        while True:  # Redis may come up after the worker
            try:
                await self.broker.ensure_groups()
                return
            except (RedisError, OSError) as error:
                log.warning("waiting for Redis: %s", error)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def _apply_model_change(self, change: dict[str, str]) -> None:
        """A model another process installed in (or deleted from) the shared store."""
        name, version, op = change["name"], change["version"], change["op"]
        if change.get("origin") == self.origin:
            return  # this process made the change
        store = self.settings.model_store.resolve()
        try:
            if op == "install":
                await asyncio.to_thread(self.registry.load_one, store, name, version, "store")
            else:
                self.registry.remove(name, version, allow_zoo=True)  # the sender checked
                if not self.registry.versions(name):
                    self.metrics.forget_model(name)
            log.info("model %s:%s: %s", name, version, op)
        except ServiceError as error:  # not in this worker's store, or already gone
            log.warning("model %s:%s: cannot %s here: %s", name, version, op, error.message)
        except Exception as error:  # noqa: BLE001 - a bad model must not stop the worker
            log.error("model %s:%s: cannot %s here: %s", name, version, op, error)
