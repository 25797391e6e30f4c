"""A batch job's life in Redis (key names: service/distributed/keys.py).

Creation writes, in one transaction, the job hash, its index entries, a `state` event,
the shards' inputs (filter) and one work message per shard. Workers move the job to
running, write each shard's output exactly once (`complete_shard` checks the done set
under WATCH, so a redelivered shard is recognised as a duplicate and changes nothing),
and the last shard ends the job (generate) or lets the worker finish it (filter:
`finish_filter`). Every change appends an event; SSE clients read the events with the
stream ids as event ids. A finished job and everything it owns expire after
IMH_JOB_TTL_S.

Example:
    >>> job_id = await store.create("generate", spec, n=10_000, shard_sizes=[4096, 4096, 1808],
    ...                             sample_shape=(2,))
    >>> (await store.get(job_id))["state"]
    'queued'
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from redis.exceptions import WatchError

from service.batch.arrays import ArrayStore, FileArrays, RedisArrays
from service.batch.schemas import TERMINAL
from service.distributed.codec import npy_header, safetensors_header, text
from service.distributed.connection import BLOCK_MS, Broker
from service.distributed.keys import JOBS

SAMPLES = "samples"
FILTER_ARRAYS = ("indices", "scores", "log_ratio", "final")  # the first is the default
_HASH_INTS = ("shards", "items", "proposals", "chain_steps", "accepted")
FOLLOWERS_S = 60  # a deleted job's events stay this long for clients following them


class JobStore:
    def __init__(self, broker: Broker, ttl_s: float, result_dir: Path | None = None):
        self.broker, self.redis, self.keys = broker, broker.redis, broker.keys
        self.ttl = int(ttl_s)
        # Embedded mode keeps job arrays in files, not in the in-process store's memory.
        self.arrays: ArrayStore = (
            FileArrays(result_dir, broker) if broker.embedded else RedisArrays(broker)
        )

    # API side ------------------------------------------------------------------------

    async def create(
        self,
        job_type: str,
        spec: dict[str, Any],
        n: int,
        shard_sizes: list[int],
        sample_shape: tuple[int, ...],
        inputs: dict[str, np.ndarray] | None = None,
        owner: str = "",
    ) -> str:
        """A new job; `owner` is a digest of the token that may read and cancel it.

        `inputs` are the job's uploaded arrays by name ("0" for shard 0's candidates,
        "data.x", ...), read back with `input` and dropped when the job ends."""
        job_id = secrets.token_hex(12)
        keys, now = self.keys, time.time()
        for name, array in (inputs or {}).items():
            await self.arrays.write(job_id, f"in:{name}", array, self.ttl)
        fields = {
            "id": job_id, "type": job_type, "state": "queued", "spec": json.dumps(spec),
            "owner": owner, "inputs": json.dumps(sorted(inputs or {})),
            "shards": len(shard_sizes), "shard_sizes": json.dumps(shard_sizes), "items": n,
            "sample_shape": json.dumps(list(sample_shape)), "proposals": 0, "chain_steps": 0,
            "accepted": 0,
            "created_at": now,
        }  # fmt: skip
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.job(job_id), mapping=fields)
            pipe.zadd(keys.jobs, {job_id: now})
            pipe.hset(keys.job_states, job_id, f"{job_type}:queued")
            self._event(pipe, job_id, "state", {"state": "queued"})
            for shard in range(len(shard_sizes)):
                pipe.xadd(keys.work(JOBS), {"kind": "shard", "job": job_id, "shard": shard})
            await pipe.execute()
        return job_id

    async def get(self, job_id: str) -> dict[str, Any] | None:
        raw = await self.redis.hgetall(self.keys.job(job_id))
        if not raw:
            return None
        done = await self.redis.smembers(self.keys.job_done(job_id))
        return _decode(raw, {int(k) for k in done})

    async def list(
        self, limit: int, state: str | None = None, owner: str | None = None
    ) -> list[dict[str, Any]]:
        """Newest first, of `owner` (a token digest; None: everyone's); ids whose job has
        expired are pruned from the index."""
        keys, found = self.keys, []
        start = 0
        while len(found) < limit:
            ids = [i.decode() for i in await self.redis.zrevrange(keys.jobs, start, start + 99)]
            if not ids:
                break
            start += len(ids)
            for job_id in ids:
                job = await self.get(job_id)
                if job is None:
                    await self.redis.zrem(keys.jobs, job_id)
                    await self.redis.hdel(keys.job_states, job_id)
                elif state in (None, job["state"]) and owner in (None, job["owner"]):
                    found.append(job)
        return found[:limit]

    async def states(self, job_ids: list[str]) -> list[str | None]:
        """Each job's state (None: gone), in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self.keys.job(job_id), "state")
            return [None if state is None else state.decode() for state in await pipe.execute()]

    async def state_counts(self) -> dict[tuple[str, str], int]:
        """(type, state) -> jobs, for the imh_jobs gauge."""
        counts: dict[tuple[str, str], int] = {}
        for value in (await self.redis.hgetall(self.keys.job_states)).values():
            job_type, _, state = value.decode().partition(":")
            counts[job_type, state] = counts.get((job_type, state), 0) + 1
        return counts

    async def delete(self, job_id: str) -> dict[str, Any] | None:
        """Cancel the job if it still runs, then forget it and its arrays; returns the job
        as it ended (None: no such job). Its event stream lingers a minute, so a client
        following it reads the final `state` event."""
        await self._end(job_id, "cancelled", None, only_if=("queued", "running"))
        job = await self.get(job_id)
        if job is None:
            return None
        keys, arrays = self.keys, await self._arrays_of(job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.job(job_id), keys.job_done(job_id))
            pipe.zrem(keys.jobs, job_id)
            pipe.hdel(keys.job_states, job_id)
            pipe.expire(keys.job_events(job_id), FOLLOWERS_S)
            await pipe.execute()
        await self._forget_arrays(job_id, arrays, ttl_s=0)
        return job

    async def events(self, job_id: str, after: str = "0") -> AsyncIterator[tuple[str, str, dict]]:
        """(event id, name, data) after `after`, until the job's last event."""
        key = self.keys.job_events(job_id)
        while True:
            reply = await self.redis.xread({key: after}, count=100, block=BLOCK_MS)
            if not reply:
                state = await self.redis.hget(self.keys.job(job_id), "state")
                if state is None or state.decode() in TERMINAL:
                    # Finished, and nothing newer than `after`: the client has every event.
                    tail = await self.redis.xrevrange(key, count=1)
                    if not tail or _order(text(tail[0][0])) <= _order(after):
                        return
                elif self.broker.poll_s:
                    await asyncio.sleep(self.broker.poll_s)
                continue
            for event_id, fields in reply[0][1]:
                after = text(event_id)
                name, data = fields[b"event"].decode(), json.loads(fields[b"data"])
                yield after, name, data
                if name == "state" and data["state"] in TERMINAL:
                    return

    async def result(self, job: dict[str, Any], array: str | None, safetensors: bool):
        """Byte chunks of a succeeded job's result (header first), read piece by piece."""
        job_id = job["id"]
        if job["type"] == "generate":
            shape = (job["counts"]["items"], *job["sample_shape"])
            dtype = np.dtype(np.float32)
            header = (
                safetensors_header([(SAMPLES, dtype, shape)]) if safetensors
                else npy_header(dtype, shape)
            )  # fmt: skip
            pieces = [f"out:{k}" for k in range(job["counts"]["shards"])]
        else:
            names = list(FILTER_ARRAYS) if safetensors else [array or FILTER_ARRAYS[0]]
            metas = []
            for name in names:
                meta = await self.arrays.meta(job_id, f"result:{name}")
                if meta is None:
                    raise LookupError(f"job {job_id}: its result has expired")
                metas.append((name, *meta))
            header = safetensors_header(metas) if safetensors else npy_header(*metas[0][1:])
            pieces = [f"result:{name}" for name in names]

        async def chunks() -> AsyncIterator[bytes]:
            yield header
            for piece in pieces:
                data = await self.arrays.data(job_id, piece)
                if data is None:
                    raise RuntimeError(f"job {job_id}: {piece} has expired")
                yield data

        return chunks()

    # Worker side ---------------------------------------------------------------------

    async def start_shard(self, job_id: str) -> dict[str, Any] | None:
        """The job, moved to running if it was queued; None if it is gone or finished."""
        job_key = self.keys.job(job_id)

        async def body(pipe) -> tuple[Any, bool]:
            state, job_type = await pipe.hmget(job_key, "state", "type")
            if state is None or state.decode() in TERMINAL:
                return None, False
            if state.decode() == "queued":
                pipe.multi()
                self._set_state(pipe, job_id, job_type.decode(), "running", started_at=time.time())
                return True, True
            return True, False

        if await self._transact([job_key], body) is None:
            return None
        return await self.get(job_id)

    async def input(self, job_id: str, name: str) -> np.ndarray | None:
        """An uploaded input array of the job (None: it has none of that name)."""
        return await self.arrays.read(job_id, f"in:{name}")

    async def shard_input(self, job_id: str, shard: int) -> np.ndarray:
        array = await self.input(job_id, str(shard))
        if array is None:
            raise LookupError(f"job {job_id}: the input of shard {shard} is gone")
        return array

    async def save_checkpoint(self, job_id: str, data: bytes) -> None:
        """A long shard's progress (a redelivered shard resumes from it)."""
        array = np.frombuffer(data, dtype=np.uint8)
        await self.arrays.write(job_id, "in:checkpoint", array, self.ttl)

    async def checkpoint(self, job_id: str) -> bytes | None:
        array = await self.input(job_id, "checkpoint")
        return None if array is None else array.tobytes()

    async def shard_output(self, job_id: str, shard: int) -> np.ndarray:
        array = await self.arrays.read(job_id, f"out:{shard}")
        if array is None:
            raise LookupError(f"job {job_id}: the output of shard {shard} is gone")
        return array

    async def is_done(self, job_id: str, shard: int) -> bool:
        return bool(await self.redis.sismember(self.keys.job_done(job_id), shard))

    async def complete_shard(
        self,
        job_id: str,
        shard: int,
        output: np.ndarray,
        proposals: int,
        accepted: int,
        chain_steps: int | None = None,
    ) -> tuple[str, bool]:
        """Write a shard's output once. Returns (outcome, all shards done).

        outcome: "done" (this call wrote it), "duplicate" (already written: a
        redelivery), "ignored" (the job is gone or finished).
        """
        keys = self.keys
        job_key, done_key = keys.job(job_id), keys.job_done(job_id)
        if not await self.is_done(job_id, shard):  # written before it counts as done
            await self.arrays.write(job_id, f"out:{shard}", output, self.ttl)

        async def body(pipe) -> tuple[Any, bool]:
            job = await pipe.hmget(job_key, "state", "type", "shards", "shard_sizes")
            if job[0] is None or job[0].decode() in TERMINAL:
                return ("ignored", False), False
            shards, sizes = int(job[2]), json.loads(job[3])
            done = {int(k) for k in await pipe.smembers(done_key)}
            if shard in done:
                return ("duplicate", len(done) == shards), False
            done.add(shard)
            pipe.multi()
            pipe.sadd(done_key, shard)
            pipe.hincrby(job_key, "proposals", proposals)
            pipe.hincrby(job_key, "chain_steps", proposals if chain_steps is None else chain_steps)
            pipe.hincrby(job_key, "accepted", accepted)
            items_done = sum(sizes[k] for k in done)
            self._event(pipe, job_id, "progress", {
                "progress": len(done) / shards, "shards_done": len(done), "shards": shards,
                "items_done": items_done, "items": sum(sizes),
            })  # fmt: skip
            if len(done) == shards and job[1].decode() == "generate":
                self._finish(pipe, job_id, "generate", "succeeded", None)
            return ("done", len(done) == shards), True

        outcome, last = await self._transact([job_key, done_key], body)
        if outcome == "done" and last:
            await self._forget_arrays(job_id, await self._arrays_of(job_id))
        return outcome, last

    async def finish_filter(
        self, job_id: str, arrays: dict[str, np.ndarray], accepted: int, proposals: int
    ) -> bool:
        """Store a filter job's result and end it; False if it had ended already."""
        job_key = self.keys.job(job_id)
        for name, array in arrays.items():
            await self.arrays.write(job_id, f"result:{name}", array, self.ttl)

        async def body(pipe) -> tuple[Any, bool]:
            state = await pipe.hget(job_key, "state")
            if state is None or state.decode() != "running":
                return False, False
            pipe.multi()
            pipe.hset(job_key, mapping={"accepted": accepted, "proposals": proposals,
                                        "chain_steps": proposals})  # fmt: skip
            self._finish(pipe, job_id, "filter", "succeeded", None)
            return True, True

        ended = await self._transact([job_key], body)
        await self._forget_arrays(job_id, await self._arrays_of(job_id))
        return ended

    async def progress(self, job_id: str, data: dict[str, Any]) -> None:
        """A progress event of a long shard (a classifier job's training)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            self._event(pipe, job_id, "progress", data)
            await pipe.execute()

    async def finish_classifier_job(self, job_id: str, output: str, report: dict[str, Any]) -> bool:
        """End a classifier job with the classifier it made; False if it had ended."""
        job_key = self.keys.job(job_id)

        async def body(pipe) -> tuple[Any, bool]:
            state, job_type = await pipe.hmget(job_key, "state", "type")
            if state is None or state.decode() != "running":
                return False, False
            pipe.multi()
            pipe.sadd(self.keys.job_done(job_id), 0)
            pipe.hset(job_key, mapping={"output": output, "report": json.dumps(report)})
            self._finish(pipe, job_id, job_type.decode(), "succeeded", None)
            return True, True

        ended = await self._transact([job_key], body)
        await self._forget_arrays(job_id, await self._arrays_of(job_id))
        return ended

    async def fail(self, job_id: str, error: str) -> None:
        await self._end(job_id, "failed", error, only_if=("queued", "running"))

    # Helpers -------------------------------------------------------------------------

    async def _end(self, job_id: str, state: str, error: str | None, only_if: tuple) -> None:
        job_key = self.keys.job(job_id)

        async def body(pipe) -> tuple[Any, bool]:
            current, job_type = await pipe.hmget(job_key, "state", "type")
            if current is None or current.decode() not in only_if:
                return False, False
            pipe.multi()
            self._finish(pipe, job_id, job_type.decode(), state, error)
            return True, True

        if await self._transact([job_key], body):
            await self._forget_arrays(job_id, await self._arrays_of(job_id))

    def _finish(self, pipe, job_id: str, job_type: str, state: str, error: str | None) -> None:
        """Queue the commands that end a job: state, event, expiry."""
        keys = self.keys
        extra: dict[str, Any] = {"finished_at": time.time()}
        if error is not None:
            extra["error"] = error
        self._set_state(pipe, job_id, job_type, state, **extra)
        for key in (keys.job(job_id), keys.job_events(job_id), keys.job_done(job_id)):
            pipe.expire(key, self.ttl)

    async def _arrays_of(self, job_id: str) -> list[str]:
        shards, inputs = await self.redis.hmget(self.keys.job(job_id), "shards", "inputs")
        names = [f"in:{name}" for name in json.loads(inputs or b"[]")] + ["in:checkpoint"]
        names += [f"out:{k}" for k in range(int(shards or 0))]
        return names + [f"result:{name}" for name in FILTER_ARRAYS]

    async def _forget_arrays(self, job_id: str, names: list[str], ttl_s: int | None = None) -> None:
        """An ended job's inputs go now; its outputs and results expire with it (after
        `ttl_s`, default the job's time to live; 0: now)."""
        await self.arrays.forget(job_id, names, self.ttl if ttl_s is None else ttl_s)

    def _set_state(self, pipe, job_id: str, job_type: str, state: str, **extra: Any) -> None:
        pipe.hset(self.keys.job(job_id), mapping={"state": state, **extra})
        pipe.hset(self.keys.job_states, job_id, f"{job_type}:{state}")
        self._event(pipe, job_id, "state", {"state": state, **extra})

    def _event(self, pipe, job_id: str, name: str, data: dict[str, Any]) -> None:
        pipe.xadd(self.keys.job_events(job_id), {"event": name, "data": json.dumps(data)})

    async def _transact(self, watch: list[str], body: Callable[[Any], Awaitable[tuple[Any, bool]]]):
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(*watch)
                    value, wrote = await body(pipe)
                    if wrote:
                        await pipe.execute()
                    else:
                        await pipe.unwatch()
                    return value
                except WatchError:
                    continue


def _decode(raw: dict[bytes, bytes], done: set[int]) -> dict[str, Any]:
    job = {k.decode(): v.decode() for k, v in raw.items()}
    sizes = json.loads(job["shard_sizes"])
    counts = {name: int(job.get(name, 0)) for name in _HASH_INTS}
    proposals, accepted, steps = counts["proposals"], counts["accepted"], counts["chain_steps"]
    number = lambda name: float(job[name]) if name in job else None  # noqa: E731
    job_id = job["id"]
    return {
        "id": job_id,
        "type": job["type"],
        "state": job["state"],
        "progress": 1.0 if job["state"] == "succeeded" else len(done) / max(len(sizes), 1),
        "counts": {
            "shards": len(sizes),
            "shards_done": len(done),
            "items": counts["items"],
            "items_done": sum(sizes[k] for k in done if k < len(sizes)),
            "proposals": proposals,
            "chain_steps": steps,
            "accepted": accepted,
            "acceptance_rate": accepted / steps if steps else None,
        },  # fmt: skip
        "created_at": float(job["created_at"]),
        "started_at": number("started_at"),
        "finished_at": number("finished_at"),
        "error": job.get("error"),
        "owner": job.get("owner", ""),
        "output": job.get("output"),
        "report": json.loads(job["report"]) if "report" in job else None,
        "spec": json.loads(job["spec"]),
        "result": f"/v1/jobs/{job_id}/result"
        if job["state"] == "succeeded" and job["type"] in ("generate", "filter")
        else None,
        "sample_shape": json.loads(job["sample_shape"]),
        "shard_sizes": sizes,
    }


def _order(stream_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = stream_id.partition("-")
    return int(milliseconds), int(sequence or 0)
