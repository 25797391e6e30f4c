"""The queue and the job store against a real Redis, in this process: poison messages
are dead-lettered after max_deliveries, shard results are written once, cancelled jobs
stop their shards."""

from __future__ import annotations

import asyncio
import secrets

import numpy as np
import pytest

from service.batch.shards import ShardRunner
from service.batch.store import JobStore
from service.distributed.connection import Broker
from service.distributed.keys import JOBS
from service.distributed.queue import WorkQueue
from service.distributed.worker import Worker
from service.metrics import Metrics
from service.settings import Settings


@pytest.fixture
def broker(redis_url):
    async def make():
        broker = Broker.connect(redis_url, prefix=f"t{secrets.token_hex(4)}")
        await broker.ensure_groups()
        return broker

    return make


def settings(**extra) -> Settings:
    return Settings(zoo=False, claim_idle_s=0.3, heartbeat_s=0.2, max_deliveries=2, **extra)


class Runner(ShardRunner):
    """ShardRunner whose shards raise (a crash) or wait, counting calls."""

    def __init__(self, store: JobStore, metrics: Metrics, crash: bool = False, hold_s=0.0):
        super().__init__(store, None, None, metrics)
        self.crash, self.hold_s, self.calls = crash, hold_s, 0

    async def run(self, job_id: str, shard: int) -> tuple[str, str]:
        self.calls += 1
        if self.crash:
            raise RuntimeError("the model segfaulted (simulated)")
        await asyncio.sleep(self.hold_s)
        return "generate", "done"


def worker_for(broker, runner, store, metrics, **extra) -> Worker:
    return Worker(broker, settings(**extra), metrics, [runner], name="w1")


async def until(check, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_a_poison_shard_is_dead_lettered_and_fails_its_job(broker):
    async def main():
        b = await broker()
        store, metrics = JobStore(b, 60), Metrics()
        runner = Runner(store, metrics, crash=True)
        job_id = await store.create("generate", {}, 10, [10], (2,))
        worker = worker_for(b, runner, store, metrics)
        task = asyncio.create_task(worker.run())
        try:
            await until(lambda: _state(store, job_id, "failed"))
        finally:
            await worker.stop(drain_s=0)
            task.cancel()
        job = await store.get(job_id)
        assert "dead-lettered" in job["error"] and "shard 0" in job["error"]
        assert runner.calls == 2  # max_deliveries, then no more
        [(_, fields)] = await b.redis.xrange(b.keys.dead)
        assert fields[b"job"].decode() == job_id and int(fields[b"deliveries"]) == 3
        assert metrics.dead_letters.labels(JOBS)._value.get() == 1
        assert metrics.redeliveries.labels(JOBS)._value.get() >= 1
        pending = await b.redis.xpending(b.keys.work(JOBS), "workers")
        assert pending["pending"] == 0  # acknowledged once dead-lettered
        await b.close()

    asyncio.run(main())


def test_a_shard_result_is_written_once(broker):
    async def main():
        b = await broker()
        store = JobStore(b, 60)
        job_id = await store.create("generate", {}, 5, [3, 2], (1,))
        await store.start_shard(job_id)
        out = np.arange(3, dtype=np.float32)[:, None]
        assert await store.complete_shard(job_id, 0, out, 30, 7) == ("done", False)
        again = await store.complete_shard(job_id, 0, out + 1, 30, 7)  # a redelivery
        assert again == ("duplicate", False)
        np.testing.assert_array_equal(await store.shard_output(job_id, 0), out)
        job = await store.get(job_id)
        assert (job["counts"]["proposals"], job["counts"]["accepted"]) == (30, 7)
        assert await store.complete_shard(job_id, 1, out[:2], 20, 1) == ("done", True)
        job = await store.get(job_id)
        assert job["state"] == "succeeded" and job["progress"] == 1.0
        events = [name async for _, name, _ in store.events(job_id)]
        assert events == ["state", "state", "progress", "progress", "state"]
        assert await store.complete_shard(job_id, 1, out[:2], 20, 1) == ("ignored", False)
        await b.close()

    asyncio.run(main())


def test_cancelling_a_job_stops_its_running_shard(broker):
    async def main():
        b = await broker()
        store, metrics = JobStore(b, 60), Metrics()
        runner = Runner(store, metrics, hold_s=30)
        job_id = await store.create("generate", {}, 10, [10], (2,))
        worker = worker_for(b, runner, store, metrics)
        task = asyncio.create_task(worker.run())
        try:
            await until(lambda: _async(runner.calls == 1))
            job = await store.delete(job_id)
            assert job["state"] == "cancelled"
            await until(lambda: _async(not worker.running), timeout=5)
            pending = await b.redis.xpending(b.keys.work(JOBS), "workers")
            assert pending["pending"] == 0  # cancelled work is acknowledged, not redelivered
        finally:
            await worker.stop(drain_s=0)
            task.cancel()
        await b.close()

    asyncio.run(main())


def test_reclaim_counts_deliveries(broker):
    async def main():
        b = await broker()
        queue = WorkQueue(b, "a", claim_idle_s=0.05, max_deliveries=3)
        await queue.submit(JOBS, {"kind": "shard", "job": "x", "shard": 0})
        [first] = await queue.read(JOBS, 10, block_ms=100)
        assert first.deliveries == 1
        other = WorkQueue(b, "b", claim_idle_s=0.05, max_deliveries=3)
        assert await other.reclaim(JOBS, 10) == []  # not idle long enough yet
        await asyncio.sleep(0.1)
        await queue.refresh(JOBS, [first.id])  # the owner is alive: idle time resets
        assert await other.reclaim(JOBS, 10) == []
        await asyncio.sleep(0.1)
        [taken] = await other.reclaim(JOBS, 10)
        assert (taken.id, taken.deliveries) == (first.id, 2)
        await b.close()

    asyncio.run(main())


async def _state(store: JobStore, job_id: str, state: str) -> bool:
    return (await store.get(job_id))["state"] == state


async def _async(value: bool) -> bool:
    return value
