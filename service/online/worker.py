"""The worker side of online sampling: runs "sample" messages on this process's engine.

An API front end (service/online/remote.py) puts a request on the online work stream
with a lease key; the worker that reads it runs it through its own `SamplingService` and
writes the events to the request's event stream. Final mode writes all samples and the
`done` event in one transaction; stream mode writes events as they come, each with the
running sample total, so a redelivered stream request (same seed, same samples) skips
what its first run already wrote: the client sees every sample once.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import numpy as np

from service.distributed.codec import pack
from service.distributed.connection import Broker, retrying
from service.distributed.keys import ONLINE
from service.distributed.queue import Message
from service.errors import EngineFailure, ServiceError
from service.online.schemas import SampleCreate
from service.online.service import SamplingService

REQUEST_TTL_S = 3600  # an online request's event stream outlives its end by this much
FINAL_CHUNK_BYTES = 4 * 2**20  # final-mode samples per stream entry
GIVE_UP_S = 60.0  # how long a result write waits for Redis before leaving it to redelivery


class OnlineWork:
    """The "sample" handler of `service.distributed.worker.Worker`."""

    kind, stream = "sample", ONLINE

    def __init__(self, broker: Broker, sampling: SamplingService, max_deliveries: int):
        self.redis, self.keys = broker.redis, broker.keys
        self.sampling, self.max_deliveries = sampling, max_deliveries

    async def handle(self, message: Message) -> None:
        request_id, mode = message.text("id"), message.text("mode")
        key = self.keys.request(request_id)
        if not await self.redis.exists(self.keys.lease(request_id)):
            return  # the client left before the work started
        written = await self._already_written(key)
        if written is None:
            return  # a previous delivery finished it
        try:
            body = SampleCreate.model_validate_json(message.fields["body"])
            if mode == "final":
                answer = await self.sampling.sample(body)
                await self._write_final(key, answer.samples.numpy(), answer.stats)
            else:
                await self._write_stream(key, body, skip=written)
        except ServiceError as error:
            await self._write(key, [_entry("error", error.wire(), written)])
        except Exception as error:  # noqa: BLE001 - the client must hear of it, and no one else can
            if message.deliveries < self.max_deliveries:
                raise
            failure = EngineFailure(f"{type(error).__name__}: {error}")
            await self._write(key, [_entry("error", failure.wire(), written)])

    async def wanted(self, messages: list[Message]) -> list[bool]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for message in messages:
                pipe.exists(self.keys.lease(message.text("id")))
            return [bool(found) for found in await pipe.execute()]

    async def give_up(self, message: Message, reason: str) -> None:
        key = self.keys.request(message.text("id"))
        written = await self._already_written(key)
        if written is not None:
            failure = EngineFailure(f"the request {reason}")
            await self._write(key, [_entry("error", failure.wire(), written)])

    async def _already_written(self, key: str) -> int | None:
        """Samples a previous delivery wrote to this stream; None if it ended the stream."""
        last = await self.redis.xrevrange(key, count=1)
        if not last:
            return 0
        fields = last[0][1]
        if fields[b"event"] in (b"done", b"error"):
            return None
        return int(fields.get(b"total", 0))

    async def _write_stream(self, key: str, body: SampleCreate, skip: int) -> None:
        total = 0
        events = (await self.sampling.events(body)).events
        async with contextlib.aclosing(events):
            async for name, data, _ in events:
                if name == "samples":
                    fresh = data[max(skip - total, 0) :]
                    total += len(data)
                    if len(fresh):
                        await self._write(key, [_entry("samples", None, total, fresh.numpy())])
                elif name == "error":
                    await self._write(key, [_entry("error", data, total)])
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

        await retrying(write, GIVE_UP_S, "writing results")


def _entry(name: str, data: Any, total: int, array: np.ndarray | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {"event": name, "total": total}
    if data is not None:
        fields["data"] = json.dumps(data, allow_nan=False)
    if array is not None:
        fields.update(pack(array))
    return fields
