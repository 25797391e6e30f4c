"""The API side of online sampling in distributed mode.

`RemoteSampling` offers what `SamplingService` offers (resolve, sample, events), but runs
the chains on workers: it checks the request here (same checks, same 4xx), then puts
it on the online work stream with a lease key, and reads the request's event stream
back. Stream events carry their Redis stream ids, which become the SSE ids; `resume`
reads a request's stream from a client's Last-Event-ID, so a reconnecting client gets
every event once.

The lease is refreshed while a client reads. A final-mode client that leaves deletes it
(the worker cancels within a second); a stream client that leaves lets it expire after
IMH_STREAM_LEASE_S, the window in which a reconnect resumes the same chains.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from redis.exceptions import RedisError

from service.distributed.codec import unpack
from service.distributed.connection import BLOCK_MS, Broker, Health
from service.distributed.keys import ONLINE
from service.errors import ModelNotFound, Unavailable, error_from
from service.online.backend import Event, Sampled, Streaming
from service.online.resolve import Resolved
from service.online.schemas import SampleCreate, request_dict
from service.online.service import SamplingService
from service.settings import Settings

log = logging.getLogger("imh.remote")
REDIS_GIVE_UP_S = 30.0  # a reader waits this long for Redis to come back


class RemoteSampling:
    """The `SamplingBackend` of an API front end in distributed mode."""

    def __init__(self, local: SamplingService, broker: Broker, health: Health, settings: Settings):
        self.local, self.broker, self.health, self.settings = local, broker, health, settings
        self.redis, self.keys = broker.redis, broker.keys
        self.lease_ms = int(settings.stream_lease_s * 1000)

    @property
    def registry(self):
        return self.local.registry

    async def resolve(self, body: SampleCreate, stream: bool) -> Resolved:
        return await self.local.resolve(body, stream)

    async def sample(self, body: SampleCreate, bulk: bool = False) -> Sampled:
        resolved = await self.local.resolve(body, stream=False)
        request_id = await self._submit(resolved)
        batches, stats, finished = [], None, False
        try:
            async for name, data, _ in self._relay(request_id, "0"):
                if name == "samples":
                    batches.append(torch.from_numpy(data.copy()))
                elif name == "done":
                    stats, finished = data, True
            shape = resolved.generator.manifest.sample_shape
            samples = torch.cat(batches) if batches else torch.empty(0, *shape)
            return Sampled(resolved, samples, stats)
        finally:
            if not finished:  # the client left: free the chains now
                with contextlib.suppress(RedisError, OSError):
                    await self.redis.delete(self.keys.lease(request_id))

    async def events(self, body: SampleCreate) -> Streaming:
        resolved = await self.local.resolve(body, stream=True)
        request_id = await self._submit(resolved)
        return Streaming(resolved, request_id, self._relay(request_id, "0", errors_as_events=True))

    async def resume(self, request_id: str, last_event_id: str) -> AsyncIterator[Event]:
        if not await self._call(lambda: self.redis.exists(self.keys.request(request_id))):
            raise ModelNotFound(f"no stream {request_id!r} (unknown, or expired)")
        await self._call(lambda: self.redis.set(self.keys.lease(request_id), 1, px=self.lease_ms))
        return self._relay(request_id, last_event_id, errors_as_events=True)

    # Helpers -------------------------------------------------------------------------

    async def _submit(self, resolved: Resolved) -> str:
        if not self.health.redis_up:
            raise Unavailable(self.health.error or "Redis is unreachable")
        if self.health.workers == 0:
            raise Unavailable("no worker is available; start `imh worker` processes")
        request_id = secrets.token_hex(12)
        body = wire_body(resolved)
        mode = "stream" if resolved.stream else "final"

        async def submit() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(self.keys.lease(request_id), 1, px=self.lease_ms)
                fields = {"kind": "sample", "id": request_id, "mode": mode, "body": body}
                pipe.xadd(self.keys.work(ONLINE), fields)
                await pipe.execute()

        await self._call(submit)
        return request_id

    async def _relay(
        self, request_id: str, after: str, errors_as_events: bool = False
    ) -> AsyncIterator[tuple[str, Any, str]]:
        """A request's events after `after` until `done` or `error`, keeping its lease."""
        key, lease = self.keys.request(request_id), self.keys.lease(request_id)
        refreshed, down_since = 0.0, None
        while True:
            try:
                if time.monotonic() - refreshed > self.settings.stream_lease_s / 4:
                    await self.redis.set(lease, 1, px=self.lease_ms)
                    refreshed = time.monotonic()
                reply = await self.redis.xread({key: after}, count=64, block=BLOCK_MS)
                down_since = None
            except (RedisError, OSError) as error:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > REDIS_GIVE_UP_S:
                    failure = Unavailable(f"lost Redis while streaming: {error}")
                    if errors_as_events:
                        yield "error", failure.wire(), after
                        return
                    raise failure from None
                await asyncio.sleep(0.5)
                continue
            if not reply:
                if self.broker.poll_s:
                    await asyncio.sleep(self.broker.poll_s)
                continue
            for event_id, fields in reply[0][1]:
                after = event_id.decode()
                name = fields[b"event"].decode()
                if name == "samples":
                    yield name, unpack(fields), after
                    continue
                data = json.loads(fields[b"data"])
                if name == "error":
                    if errors_as_events:
                        yield name, data, after
                        return
                    raise error_from(data)
                yield name, data, after
                if name == "done":
                    return

    async def _call(self, make_call):
        try:
            return await make_call()
        except (RedisError, OSError) as error:
            raise Unavailable(f"Redis is unreachable: {error}") from None


def wire_body(resolved: Resolved) -> str:
    """The request as JSON a worker validates again, with its seed and the exact model
    versions this front end resolved fixed (a worker loads those it lacks)."""
    pinned = {"seed": resolved.seed, "generator": resolved.generator.ref}
    if resolved.discriminator is not None:
        pinned["discriminator"] = resolved.discriminator.ref
    return json.dumps({**request_dict(resolved.body), **pinned})
