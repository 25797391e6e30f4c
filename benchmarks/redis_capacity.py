"""Redis capacity: what one Redis server carries of the service's traffic, measured here.

Run:  .venv/bin/python -m benchmarks.redis_capacity           (about 2 minutes on 2 cores)
      .venv/bin/python -m benchmarks.redis_capacity --quick   (smoke check, figures not written)

Starts a private redis-server (free loopback port, temporary directory, append-only file
fsynced every second, as deployed) and measures, with the service's own key names:

(a) Round trip: PING and the XADD of a work message from redis-py's asyncio client (the
    service's client), one connection, one command at a time; median and 99th percentile.
(b) Raw command rate with redis-benchmark (C client, 50 connections): the XADD of a work
    message, unpipelined and 16 deep. The ceiling of the server alone for that command.
(c) One online request's Redis traffic as the front end and the worker issue it
    (service/distributed/remote.py, worker.py, queue.py), final mode:
        front end  MULTI SET lease, XADD {p}:work:online EXEC
        worker     XREADGROUP (batched), EXISTS lease, XREVRANGE {p}:req:{id} COUNT 1,
                   MULTI XADD samples, XADD done, EXPIRE EXEC, XACK
        front end  XREAD {p}:req:{id} (until done), DEL lease
    for toy25 and digits sample sizes. Reported: requests per second reached here (the
    Python clients of this script are the limit on 2 cores) and Redis CPU time per
    request, whose inverse is what one Redis core can carry.
(d) Sample bandwidth: entries of 1 KiB to 4 MiB written (XADD) and read back (XREAD),
    as results travel; MB/s and Redis CPU per MiB, append-only file on and off.
(e) Memory: bytes a work message keeps in its stream (work streams are not trimmed),
    and bytes per payload byte in a request stream (kept an hour after its last event).

Writes docs/BENCHMARKS.md, section "redis-capacity".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis import asyncio as aioredis

from benchmarks.processes import free_port
from benchmarks.report import markdown_table, write_section
from service.distributed.keys import GROUP, ONLINE, Keys

COMMAND = ".venv/bin/python -m benchmarks.redis_capacity"
KEYS = Keys("bench")
# A work message as the front end writes it: a request id and the request's JSON.
WORK_FIELDS = {
    "kind": "sample",
    "id": "0123456789abcdef01234567",
    "mode": "final",
    "body": json.dumps(
        {
            "generator": "digits",
            "method": "imh",
            "n": 512,
            "steps": 20,
            "calibration": "isotonic",
            "params": {},
            "format": "json",
            "seed": 1234567890,
        }
    ),  # fmt: skip
}
STATS = json.dumps({"proposals": 10752, "accepted": 3301, "acceptance_rate": 0.307,
                    "elapsed_s": 0.7, "steps": 20, "chains": 512})  # fmt: skip
# Sample sizes of the zoo models as float32: toy25 a 2-vector, digits a 1x8x8 image.
BYTES_PER_SAMPLE = {"toy25": 2 * 4, "digits": 64 * 4}
# (model, samples per request) for (c): tiny, typical and large final-mode answers.
REQUESTS = [("toy25", 16), ("toy25", 2048), ("digits", 64), ("digits", 512)]
ENTRY_SIZES = [1 << 10, 16 << 10, 256 << 10, 1 << 20, 4 << 20]  # (d); 4 MiB: the worker's chunk


class RedisServer:
    """A private redis-server on a free loopback port, in its own temporary directory."""

    def __init__(self, appendonly: bool = True):
        self.dir = Path(tempfile.mkdtemp(prefix="imh-redis-bench-"))
        self.port = free_port()
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--appendfsync", "everysec",
                "--appendonly", "yes" if appendonly else "no"]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                assert self.process.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.05)
        self.version = self.client.info("server")["redis_version"]

    def cpu_s(self) -> float:
        """Redis's CPU seconds so far, all threads (user + system)."""
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def aof(self, on: bool) -> None:
        self.client.config_set("appendonly", "yes" if on else "no")
        while int(self.client.info("persistence").get("aof_rewrite_in_progress", 0)):
            time.sleep(0.05)

    def stop(self) -> None:
        try:
            self.client.shutdown(nosave=True)
        except redis.ConnectionError:
            pass
        self.process.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- (a) round trip -------------------------------------------------------------------


async def round_trips(port: int, count: int) -> dict[str, tuple[float, float]]:
    """Median and 99th percentile microseconds of PING and of a work-message XADD."""
    client = aioredis.Redis(port=port)
    out = {}
    try:
        for name, call in [
            ("PING", client.ping),
            ("XADD work message", lambda: client.xadd("bench:rtt", WORK_FIELDS)),
        ]:
            for _ in range(100):  # warm-up
                await call()
            times = []
            for _ in range(count):
                started = time.perf_counter()
                await call()
                times.append((time.perf_counter() - started) * 1e6)
            times.sort()
            out[name] = (statistics.median(times), times[int(0.99 * (len(times) - 1))])
        await client.delete("bench:rtt")
    finally:
        await client.aclose()
    return out


# --- (b) redis-benchmark --------------------------------------------------------------


def redis_benchmark(port: int, requests: int, pipeline: int) -> float:
    """XADDs of a work message per second, 50 connections, `pipeline` deep."""
    argv = ["redis-benchmark", "-p", str(port), "-c", "50", "-n", str(requests),
            "-P", str(pipeline), "--csv", "XADD", "bench:rb", "*"]  # fmt: skip
    for key, value in WORK_FIELDS.items():
        argv += [key, value]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True)
    redis.Redis(port=port).delete("bench:rb")
    # The CSV's first column is the command line, whose JSON quotes redis-benchmark does
    # not escape: read the 7 numeric columns from the right.
    line = result.stdout.strip().splitlines()[-1]
    return float(line.split(",")[-7].strip('"'))


# --- (c) one online request's traffic ------------------------------------------------


async def request_traffic(
    server: RedisServer, samples: int, bytes_per_sample: int, concurrent: int, seconds: float
) -> dict[str, float]:
    """Final-mode requests end to end through Redis, `concurrent` at a time for `seconds`."""
    api, worker = aioredis.Redis(port=server.port), aioredis.Redis(port=server.port)
    work = KEYS.work(ONLINE)
    await api.delete(work)
    await api.xgroup_create(work, GROUP, id="0", mkstream=True)
    payload = os.urandom(samples * bytes_per_sample)
    shape = f"{samples},{bytes_per_sample // 4}"
    stop, stop_worker = asyncio.Event(), asyncio.Event()
    done = 0
    handlers: set[asyncio.Task] = set()
    failures: list[BaseException] = []

    async def handle(message_id: bytes, fields: dict) -> None:  # the worker's side
        try:
            await handle_one(message_id, fields)
        except Exception as error:  # noqa: BLE001 - end the run, report it below
            failures.append(error)
            stop.set()

    async def handle_one(message_id: bytes, fields: dict) -> None:
        request_id = fields[b"id"].decode()
        key = KEYS.request(request_id)
        await worker.exists(KEYS.lease(request_id))
        await worker.xrevrange(key, count=1)
        async with worker.pipeline(transaction=True) as pipe:
            pipe.xadd(key, {"event": "samples", "total": samples, "dtype": "float32",
                            "shape": shape, "data": payload})  # fmt: skip
            pipe.xadd(key, {"event": "done", "total": samples, "data": STATS})
            pipe.expire(key, 3600)
            await pipe.execute()
        await worker.xack(work, GROUP, message_id)

    async def consume() -> None:
        while not stop_worker.is_set():
            reply = await worker.xreadgroup(GROUP, "bench-worker", {work: ">"}, count=64, block=100)
            for _, entries in reply or []:
                for message_id, fields in entries:
                    task = asyncio.create_task(handle(message_id, fields))
                    handlers.add(task)
                    task.add_done_callback(handlers.discard)

    async def client() -> None:  # the front end's side, one request after another
        nonlocal done
        while not stop.is_set():
            request_id = secrets.token_hex(12)
            key, lease = KEYS.request(request_id), KEYS.lease(request_id)
            async with api.pipeline(transaction=True) as pipe:
                pipe.set(lease, 1, px=10_000)
                pipe.xadd(work, {**WORK_FIELDS, "id": request_id})
                await pipe.execute()
            after, finished = "0", False
            while not finished and not failures:
                reply = await api.xread({key: after}, count=64, block=1000)
                for _, entries in reply or []:
                    for event_id, fields in entries:
                        after = event_id.decode()
                        finished = fields[b"event"] == b"done"
            await api.delete(lease)
            done += 1

    consumer = asyncio.create_task(consume())
    clients = [asyncio.create_task(client()) for _ in range(concurrent)]
    await asyncio.sleep(min(1.0, seconds / 4))  # warm-up: connections, allocator
    first_done, cpu0, started = done, server.cpu_s(), time.perf_counter()
    await asyncio.sleep(seconds)
    count, cpu, elapsed = done - first_done, server.cpu_s() - cpu0, time.perf_counter() - started
    stop.set()  # clients finish the request they are in, then the worker stops
    await asyncio.gather(*clients)
    stop_worker.set()
    await asyncio.gather(consumer, *handlers)
    if failures:
        raise failures[0]
    xlen = await api.xlen(work)
    work_bytes = await api.memory_usage(work, samples=0)
    request_key = KEYS.request(secrets.token_hex(12))  # one request stream, for its memory
    await api.xadd(request_key, {"event": "samples", "total": samples, "dtype": "float32",
                                 "shape": shape, "data": payload})  # fmt: skip
    stream_bytes = await api.memory_usage(request_key, samples=0)
    await api.flushdb()
    await api.aclose()
    await worker.aclose()
    return {
        "requests_s": count / elapsed,
        "redis_us": cpu / max(count, 1) * 1e6,
        "work_message_bytes": work_bytes / max(xlen, 1),
        "stream_overhead": stream_bytes / max(len(payload), 1),
    }


# --- (d) sample bandwidth ------------------------------------------------------------


def bandwidth(server: RedisServer, size: int, total_bytes: int) -> dict[str, float]:
    """XADD entries of `size` bytes and XREAD them back, 8 in flight per round trip."""
    client = server.client
    payload = os.urandom(size)
    entries = max(total_bytes // size, 16)
    key, after = KEYS.request("bandwidth"), "0"
    client.delete(key)
    cpu0, started = server.cpu_s(), time.perf_counter()
    for first in range(0, entries, 8):
        with client.pipeline(transaction=False) as pipe:
            for _ in range(min(8, entries - first)):
                pipe.xadd(key, {"event": "samples", "data": payload})
            pipe.execute()
        for _, read in client.xread({key: after}, count=8):
            after = read[-1][0].decode()
        client.xtrim(key, minid=after)  # keep memory flat: results expire in the service
    elapsed, cpu = time.perf_counter() - started, server.cpu_s() - cpu0
    client.delete(key)
    moved = entries * size
    return {"mb_s": moved / elapsed / 1e6, "cpu_ms_per_mib": cpu / (moved / 2**20) * 1e3}


# --- main -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke check; nothing written")
    args = parser.parse_args()
    quick = args.quick
    if shutil.which("redis-server") is None or shutil.which("redis-benchmark") is None:
        raise SystemExit("needs redis-server and redis-benchmark (Debian package redis-server)")

    server = RedisServer(appendonly=True)
    try:
        rtt = asyncio.run(round_trips(server.port, 500 if quick else 5000))
        raw = {p: redis_benchmark(server.port, 20_000 if quick else 300_000, p) for p in (1, 16)}
        traffic = {}
        for model, samples in REQUESTS:
            traffic[model, samples] = asyncio.run(request_traffic(
                server, samples, BYTES_PER_SAMPLE[model], concurrent=32,
                seconds=1.0 if quick else 8.0,
            ))  # fmt: skip
            print(model, samples, traffic[model, samples], flush=True)
        sweep = {}
        for aof in (True, False):
            server.aof(aof)
            for size in ENTRY_SIZES:
                total = (16 << 20) if quick else (384 << 20 if size >= 16 << 10 else 48 << 20)
                sweep[aof, size] = bandwidth(server, size, total)
                print("aof" if aof else "no aof", size, sweep[aof, size], flush=True)
        version = server.version
    finally:
        server.stop()

    rtt_rows = [[name, f"{median:.0f}", f"{p99:.0f}"] for name, (median, p99) in rtt.items()]
    raw_rows = [[f"XADD work message, {p} deep", f"{rate:,.0f}"] for p, rate in raw.items()]
    traffic_rows = []
    for (model, samples), t in traffic.items():
        payload = samples * BYTES_PER_SAMPLE[model]
        traffic_rows.append([
            f"{model}, n {samples}", f"{payload:,}", f"{t['requests_s']:,.0f}",
            f"{t['redis_us']:.0f}", f"{1e6 / t['redis_us']:,.0f}",
            f"{1e6 / t['redis_us'] * payload / 1e6:,.1f}",
        ])  # fmt: skip
    sweep_rows = []
    for size in ENTRY_SIZES:
        on, off = sweep[True, size], sweep[False, size]
        sweep_rows.append([
            f"{size >> 10:,} KiB", f"{on['mb_s']:,.0f}", f"{on['cpu_ms_per_mib']:.2f}",
            f"{1e3 / on['cpu_ms_per_mib']:,.0f}",
            f"{off['mb_s']:,.0f}", f"{off['cpu_ms_per_mib']:.2f}",
            f"{1e3 / off['cpu_ms_per_mib']:,.0f}",
        ])  # fmt: skip
    work_bytes = statistics.median(t["work_message_bytes"] for t in traffic.values())
    overhead = traffic["digits", 512]["stream_overhead"]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = "\n\n".join([
        "## Redis capacity: the service's traffic on one Redis server",
        f"Command: `{COMMAND}` (one run, about 2 minutes). Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores shared with other work; redis-server {version} on the "
        "same machine (loopback), append-only file fsynced every second as deployed; the "
        f"clients are redis-py {redis.__version__}'s asyncio client (the service's) unless "
        "named.",
        "(a) Round trip, one connection, one command at a time (microseconds):",
        markdown_table(["command", "median us", "p99 us"], rtt_rows),
        "(b) Raw command rate, redis-benchmark (C client, 50 connections):",
        markdown_table(["command", "per second"], raw_rows),
        "(c) One final-mode online request's Redis traffic (front end and worker, 11 "
        "commands in 8 round trips; 32 requests in flight):",
        markdown_table(
            ["request", "sample bytes", "requests/s reached here", "Redis CPU us per request",
             "requests/s one Redis core carries", "sample MB/s at that rate"],
            traffic_rows,
        ),
        "(d) Results through a stream: entries written (XADD) and read back (XREAD), "
        "8 per round trip:",
        markdown_table(
            ["entry size", "MB/s reached, AOF on", "Redis CPU ms per MiB, AOF on",
             "MiB/s one Redis core carries, AOF on", "MB/s reached, AOF off",
             "Redis CPU ms per MiB, AOF off", "MiB/s one Redis core carries, AOF off"],
            sweep_rows,
        ),
        f"(e) Memory: a work message keeps about {work_bytes:,.0f} bytes in its stream "
        "after it is acknowledged (work streams are not trimmed); a request stream holds "
        f"its samples at {overhead:.3f} bytes per payload byte.",
        "- Reading: Redis runs commands on one thread, so the inverse of its CPU time per "
        "request is the ceiling of one Redis server for that request size (column 5). The "
        "Python clients of this script, on the same 2 cores, are what limits column 3, not "
        "Redis. Round trips are loopback; across machines add the network's (typically "
        "100 to 500 us inside a data centre), which costs latency, not Redis capacity.",
        "- The capacity model built on these figures is in docs/DISTRIBUTED.md, section "
        "\"Capacity\".",
        f"- The machine is shared: load average {load} (1, 5, 15 min) when the run ended.",
    ])  # fmt: skip
    if quick:
        print(text)
        return
    path = write_section("BENCHMARKS.md", "redis-capacity", text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
