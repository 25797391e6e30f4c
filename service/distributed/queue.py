"""The work streams and their consumer group: what a worker reads, refreshes and acks.

Delivery is at-least-once. A worker reads new messages with XREADGROUP; while it runs
one it refreshes the message's idle time (XCLAIM ... JUSTID, which does not count as a
delivery), and it acknowledges (XACK) only after the result is written. A worker that
dies stops refreshing: after `claim_idle_s` another worker takes the message over with
XAUTOCLAIM. Every delivery counts (XPENDING); a message delivered more than
`max_deliveries` times is poison: it moves to the dead-letter stream, its owner (a
request or a job) is told, and it is acknowledged. Results are written idempotently by
the handlers (service/batch/store.py), so a redelivered message never counts twice.

Example:
    >>> queue = WorkQueue(broker, "worker-1", claim_idle_s=30, max_deliveries=5)
    >>> for message in await queue.read(ONLINE, count=8):
    ...     ...; await queue.ack(message)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, NamedTuple

from redis.exceptions import ResponseError

from service.distributed.codec import text
from service.distributed.connection import BLOCK_MS, Broker
from service.distributed.keys import GROUP


class Message(NamedTuple):
    stream: str  # "online" or "jobs"
    id: str
    fields: dict[str, bytes]
    deliveries: int  # 1 on first delivery

    def text(self, name: str) -> str:
        return self.fields[name].decode()

    @property
    def kind(self) -> str:
        """What the message asks for ("sample", "shard"): picks its handler."""
        return self.fields.get("kind", b"").decode()


class WorkQueue:
    def __init__(self, broker: Broker, consumer: str, claim_idle_s: float, max_deliveries: int):
        self.broker, self.redis, self.keys = broker, broker.redis, broker.keys
        self.consumer = consumer
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.max_deliveries = max_deliveries

    async def submit(self, stream: str, fields: dict[str, Any], pipe: Any = None) -> None:
        await (pipe or self.redis).xadd(self.keys.work(stream), fields)

    async def read(self, stream: str, count: int, block_ms: int = BLOCK_MS) -> list[Message]:
        """New messages for this consumer (waits up to block_ms for the first)."""
        try:
            reply = await self.redis.xreadgroup(
                GROUP, self.consumer, {self.keys.work(stream): ">"}, count=count, block=block_ms
            )
        except ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            await self.broker.ensure_groups()  # Redis restarted without its data
            return []
        if not reply:
            if self.broker.poll_s:
                await asyncio.sleep(self.broker.poll_s)
            return []
        [(_, entries)] = reply
        return [Message(stream, text(mid), _fields(fields), 1) for mid, fields in entries if fields]

    async def reclaim(self, stream: str, count: int) -> list[Message]:
        """Messages idle longer than claim_idle_s, now owned by this consumer.

        Their delivery counts come from XPENDING; messages deleted meanwhile are dropped.
        """
        key = self.keys.work(stream)
        reply = await self.redis.xautoclaim(
            key, GROUP, self.consumer, self.claim_idle_ms, "0-0", count=count
        )
        entries = [(mid, fields) for mid, fields in reply[1] if fields]
        if not entries:
            return []
        deliveries = {}
        for mid, _ in entries:
            pending = await self.redis.xpending_range(key, GROUP, mid, mid, 1)
            deliveries[text(mid)] = pending[0]["times_delivered"] if pending else 1
        return [
            Message(stream, text(mid), _fields(fields), deliveries[text(mid)])
            for mid, fields in entries
        ]

    async def refresh(self, stream: str, ids: list[str]) -> None:
        """Reset the idle time of messages this consumer is still running."""
        if ids:
            await self.redis.xclaim(
                self.keys.work(stream), GROUP, self.consumer, 0, ids, justid=True
            )

    async def release(self, stream: str, ids: list[str]) -> None:
        """Hand messages back: their idle time is set past the reclaim threshold, so the
        next XAUTOCLAIM of any worker takes them over (a draining worker's unfinished work)."""
        if ids:
            await self.redis.xclaim(
                self.keys.work(stream), GROUP, self.consumer, 0, ids,
                idle=self.claim_idle_ms + 1, justid=True,
            )  # fmt: skip

    async def ack(self, message: Message) -> None:
        await self.redis.xack(self.keys.work(message.stream), GROUP, message.id)

    async def dead_letter(self, message: Message, reason: str) -> None:
        """Move a poison message aside (with why and when) and acknowledge it."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                self.keys.dead,
                {**message.fields, "stream": message.stream, "message_id": message.id,
                 "deliveries": message.deliveries, "reason": reason, "at": time.time()},
                maxlen=100_000, approximate=True,
            )  # fmt: skip
            pipe.xack(self.keys.work(message.stream), GROUP, message.id)
            await pipe.execute()


async def depth(broker: Broker, stream: str) -> int:
    """Messages not yet acknowledged: waiting for a worker plus being worked on."""
    for group in await broker.redis.xinfo_groups(broker.keys.work(stream)):
        if text(group["name"]) == GROUP:
            return int(group.get("pending") or 0) + int(group.get("lag") or 0)
    return 0


def _fields(fields: dict) -> dict[str, bytes]:
    return {text(k): v for k, v in fields.items()}
