"""Redis clients and the health monitor.

`Broker` bundles a client with the key names. With a URL it talks to a real Redis
server; without one (embedded mode) to an in-process store (fakeredis) that speaks the
same commands, so batch jobs run the same code in both modes. Blocking reads do not
block on the in-process store: loops sleep `poll_s` after an empty read instead.

`Health` pings Redis and counts live workers once a second; /readyz and the work routes
read its last answer, so a Redis outage costs a request nothing but a quick 503, and
recovery needs no restart (the client reconnects on its next command).

Example:
    >>> broker = Broker.connect("redis://127.0.0.1:6379/0", prefix="imh")
    >>> await broker.ensure_groups()
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis import asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from service.distributed.keys import GROUP, STREAMS, Keys

log = logging.getLogger("imh.redis")
T = TypeVar("T")
BLOCK_MS = 1000  # blocking reads wake up this often to notice shutdown
EMBEDDED_POLL_S = 0.01


@dataclass
class Broker:
    redis: Any  # redis.asyncio.Redis or fakeredis.FakeAsyncRedis
    keys: Keys
    embedded: bool = False

    @classmethod
    def connect(cls, url: str | None, prefix: str = "imh") -> Broker:
        if url is None:
            import fakeredis

            return cls(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()), Keys(prefix), True)
        client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=2.0,
            socket_timeout=BLOCK_MS / 1000 + 10.0,  # longer than any blocking read
            health_check_interval=10,
        )
        return cls(client, Keys(prefix), False)

    @property
    def poll_s(self) -> float:
        """Sleep after an empty blocking read (the in-process store does not block)."""
        return EMBEDDED_POLL_S if self.embedded else 0.0

    async def ensure_groups(self) -> None:
        """Create the work streams and their consumer group (idempotent)."""
        for stream in STREAMS:
            try:
                await self.redis.xgroup_create(self.keys.work(stream), GROUP, id="0", mkstream=True)
            except ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise

    async def close(self) -> None:
        await self.redis.aclose()

    async def announce_model(self, op: str, name: str, version: str, origin: str) -> None:
        """Tell every process that shares the model store to load (or drop) a version."""
        message = {"op": op, "name": name, "version": version, "origin": origin}
        await self.redis.publish(self.keys.models, json.dumps(message))

    async def follow_models(self, apply: Callable[[dict[str, str]], Awaitable[None]]) -> None:
        """Call `apply(change)` for every announced model change, until cancelled;
        reconnects when Redis comes back."""
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.keys.models)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            await apply(json.loads(message["data"]))
            except (RedisError, OSError) as error:
                log.warning("model announcements: Redis is unreachable (%s); retrying", error)
                await asyncio.sleep(1.0)


async def retrying(
    call: Callable[[], Awaitable[T]], give_up_s: float, what: str, stop: asyncio.Event | None = None
) -> T:
    """`call()` until it gets through Redis, for at most `give_up_s` (then the last error).

    For writes that must not be lost while Redis restarts: a result, an acknowledgement.
    """
    deadline, pause, warned = time.monotonic() + give_up_s, 0.1, False
    while True:
        try:
            return await call()
        except RedisError as error:
            if time.monotonic() + pause > deadline or (stop is not None and stop.is_set()):
                raise
            if not warned:
                log.warning("%s: Redis unavailable (%s); retrying", what, error)
                warned = True
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)


@dataclass
class Health:
    """What the API knows of Redis and the workers, refreshed every `interval_s`."""

    broker: Broker
    interval_s: float = 1.0
    redis_up: bool = False
    workers: int = 0
    error: str | None = "not checked yet"
    checked_at: float = 0.0

    async def check(self) -> None:
        keys, redis = self.broker.keys, self.broker.redis
        try:
            await redis.ping()
            names = sorted(await redis.smembers(keys.workers))
            alive = 0
            if names:
                exists = await asyncio.gather(
                    *(redis.exists(keys.worker(n.decode())) for n in names)
                )
                gone = [name for name, found in zip(names, exists, strict=True) if not found]
                if gone:
                    await redis.srem(keys.workers, *gone)
                alive = len(names) - len(gone)
            if not self.redis_up:
                log.info("Redis is reachable")
                await self.broker.ensure_groups()  # a restarted Redis without its data
            self.redis_up, self.workers, self.error = True, alive, None
        except (RedisError, OSError) as error:
            if self.redis_up or self.error == "not checked yet":
                log.warning("Redis is unreachable: %s", error)
            self.redis_up, self.error = False, f"Redis is unreachable: {error}"
        self.checked_at = time.monotonic()

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)
