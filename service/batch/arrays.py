"""Where a job's arrays live: uploaded inputs, shard outputs, results, checkpoints.

Each array is named within its job ("in:3", "in:data.x", "out:3", "result:indices",
"in:checkpoint"); names starting "in:" are dropped as soon as the job ends.

- `RedisArrays` (distributed mode): a hash per array (dtype, shape, raw bytes) at
  `<job key>:<name>`, so every worker and front end reads the same data;
- `FileArrays` (embedded mode): a `.npy` file per array under `<folder>/<job id>/`, so
  finished results wait on disk, not in the process's memory. A folder whose job has
  expired is removed by `sweep`.

Arrays are written before the job's state says they exist (a reader never sees a
half-written array), and writing the same array twice is harmless: a redelivered
shard writes the same output.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np

from service.distributed.codec import pack, parse_shape, text, unpack
from service.distributed.connection import Broker

Meta = tuple[np.dtype, tuple[int, ...]]
SWEEP_AFTER_S = 60.0  # a job folder this old without its job has expired


class ArrayStore(Protocol):
    async def write(self, job_id: str, name: str, array: np.ndarray, ttl_s: int) -> None: ...

    async def read(self, job_id: str, name: str) -> np.ndarray | None: ...

    async def meta(self, job_id: str, name: str) -> Meta | None: ...

    async def data(self, job_id: str, name: str) -> bytes | None:
        """The array's raw C-order bytes (what follows a .npy or .safetensors header)."""
        ...

    async def forget(self, job_id: str, names: Iterable[str], ttl_s: int) -> None:
        """The job has ended: these arrays expire after `ttl_s` (inputs: at once)."""
        ...


class RedisArrays:
    def __init__(self, broker: Broker):
        self.redis, self.keys = broker.redis, broker.keys

    def _key(self, job_id: str, name: str) -> str:
        return f"{self.keys.job(job_id)}:{name}"

    async def write(self, job_id: str, name: str, array: np.ndarray, ttl_s: int) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(job_id, name), mapping=pack(array))
            pipe.expire(self._key(job_id, name), ttl_s)
            await pipe.execute()

    async def read(self, job_id: str, name: str) -> np.ndarray | None:
        fields = await self.redis.hgetall(self._key(job_id, name))
        return unpack(fields) if fields else None

    async def meta(self, job_id: str, name: str) -> Meta | None:
        dtype, shape = await self.redis.hmget(self._key(job_id, name), "dtype", "shape")
        return None if dtype is None else (np.dtype(text(dtype)), parse_shape(shape))

    async def data(self, job_id: str, name: str) -> bytes | None:
        return await self.redis.hget(self._key(job_id, name), "data")

    async def forget(self, job_id: str, names: Iterable[str], ttl_s: int) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                key = self._key(job_id, name)
                gone_now = name.startswith("in:") or ttl_s <= 0
                pipe.delete(key) if gone_now else pipe.expire(key, ttl_s)
            await pipe.execute()


class FileArrays:
    def __init__(self, folder: Path | None, broker: Broker):
        self.folder = folder or Path(tempfile.mkdtemp(prefix="imh-jobs-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.redis, self.keys = broker.redis, broker.keys

    def _path(self, job_id: str, name: str) -> Path:
        return self.folder / job_id / (name.replace(":", "-") + ".npy")

    async def write(self, job_id: str, name: str, array: np.ndarray, ttl_s: int) -> None:
        await asyncio.to_thread(self._write, self._path(job_id, name), array)

    @staticmethod
    def _write(path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        with partial.open("wb") as file:
            np.save(file, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(partial, path)  # readers see the whole array or none

    async def read(self, job_id: str, name: str) -> np.ndarray | None:
        path = self._path(job_id, name)
        if not path.is_file():
            return None
        return await asyncio.to_thread(np.load, path, allow_pickle=False)

    async def meta(self, job_id: str, name: str) -> Meta | None:
        array = await self._mapped(job_id, name)
        return None if array is None else (array.dtype, tuple(array.shape))

    async def data(self, job_id: str, name: str) -> bytes | None:
        array = await self._mapped(job_id, name)
        return None if array is None else await asyncio.to_thread(array.tobytes)

    async def _mapped(self, job_id: str, name: str) -> np.ndarray | None:
        path = self._path(job_id, name)
        return np.load(path, mmap_mode="r", allow_pickle=False) if path.is_file() else None

    async def forget(self, job_id: str, names: Iterable[str], ttl_s: int) -> None:
        for name in names:
            if name.startswith("in:") or ttl_s <= 0:
                self._path(job_id, name).unlink(missing_ok=True)
        await self.sweep()

    async def sweep(self) -> None:
        """Remove the folders of jobs that have expired from the store (not the folder of
        a job being created: its inputs are written just before the job itself)."""
        settled = time.time() - SWEEP_AFTER_S
        for folder in list(self.folder.iterdir()):
            if not folder.is_dir() or folder.stat().st_mtime > settled:
                continue
            if not await self.redis.exists(self.keys.job(folder.name)):
                await asyncio.to_thread(shutil.rmtree, folder, True)
