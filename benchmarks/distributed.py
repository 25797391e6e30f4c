"""Distributed mode against embedded mode, and batch jobs on one and on two workers.

Run:  .venv/bin/python -m benchmarks.distributed          (about 4 minutes on 2 cores)
      .venv/bin/python -m benchmarks.distributed --quick  (smoke check, figures not written)

Needs a redis-server at IMH_REDIS_URL (default redis://127.0.0.1:6379/0). Every key of
the run lives under a fresh IMH_REDIS_PREFIX (bench<hex>), deleted at the end.

(a) Online sampling through HTTP: proposals per second of POST /v1/sample (imh) against a
    front end with one `imh worker` (distributed) over the same request against an
    embedded `imh serve` (sampling in-process); toy25 and digits, one client, and 16
    concurrent clients (httpx.AsyncClient) asking 64 toy25 samples each.
(b) A filter job (POST /v1/jobs, multipart upload of digits candidates, digits-d, imh):
    candidates per second with one worker and with two, in the service (finished_at -
    created_at) and end to end (from the start of the upload to the poll that sees the
    job done).
(c) A generate job (digits, imh): samples per second with one worker and with two.

Every process runs with IMH_TORCH_THREADS=1. Every ratio comes from one run; each round
measures both sides moments apart, in alternating order. Writes docs/BENCHMARKS.md,
section "distributed".
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import secrets
import statistics
import tempfile
import textwrap
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import redis
import torch

from benchmarks.processes import Process
from benchmarks.report import machine, markdown_table, write_section
from benchmarks.serve import Rounds

COMMAND = ".venv/bin/python -m benchmarks.distributed"
GOAL = ">= 0.8"  # online sampling, distributed with one worker over embedded
REDIS_URL = os.environ.get("IMH_REDIS_URL", "redis://127.0.0.1:6379/0")
POLL_S = 0.05  # job polling: fine enough for jobs of seconds, light on the front end


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a process, all its threads; 0 where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def redis_pid() -> int | None:
    """Redis's pid when it runs on this machine (its CPU counts in the jobs' cores busy)."""
    host = redis.Redis.from_url(REDIS_URL)
    try:
        if host.connection_pool.connection_kwargs.get("host") not in ("127.0.0.1", "localhost"):
            return None
        return int(host.info("server")["process_id"])
    finally:
        host.close()


class Cluster:
    """The processes of one run: an embedded server, a distributed front end, workers."""

    def __init__(self, store: Path, prefix: str):
        base = {k: v for k, v in os.environ.items() if not k.startswith("IMH_")}
        base.update(IMH_MODEL_STORE=str(store), IMH_TORCH_THREADS="1", IMH_LOG_LEVEL="warning")
        self.embedded_env = base
        self.distributed_env = {
            **base,
            "IMH_REDIS_URL": REDIS_URL,
            "IMH_REDIS_PREFIX": prefix,
            # Enough filter shards (and generate shards) for two workers to share.
            "IMH_FILTER_SHARD_ROWS": "4096",
            "IMH_JOB_SHARD_ROWS": "2048",
        }
        self.processes: list[Process] = []
        self.workers: list[Process] = []
        self.redis_pid = redis_pid()

    def start(self, command: str, distributed: bool) -> Process:
        process = Process(command, self.distributed_env if distributed else self.embedded_env)
        self.processes.append(process)
        return process

    def add_worker(self) -> None:
        self.workers.append(self.start("worker", distributed=True))

    def remove_worker(self) -> None:
        worker = self.workers.pop()
        worker.stop()
        self.processes.remove(worker)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def cpu_seconds(self) -> float:
        """CPU time so far of the running servers, workers and Redis (Linux /proc)."""
        pids = [p.process.pid for p in self.processes if p.process.poll() is None]
        return sum(cpu_seconds(pid) for pid in [*pids, self.redis_pid] if pid is not None)


def sample_body(generator: str, n: int, steps: int, seed: int) -> dict:
    return {"generator": generator, "method": "imh", "n": n, "steps": steps, "seed": seed}


def http_rate(client: httpx.Client, generator: str, n: int, steps: int, seed: int) -> float:
    """Proposals per second of one POST /v1/sample, timed at the client."""
    started = time.perf_counter()
    answer = client.post("/v1/sample", json=sample_body(generator, n, steps, seed))
    answer.raise_for_status()
    return answer.json()["stats"]["proposals"] / (time.perf_counter() - started)


def request_rate(client: httpx.Client, generator: str, requests: int) -> float:
    """Requests per second of one client sending tiny requests (n 16, 1 step) in turn."""
    started = time.perf_counter()
    for seed in range(requests):
        client.post("/v1/sample", json=sample_body(generator, 16, 1, seed)).raise_for_status()
    return requests / (time.perf_counter() - started)


async def concurrent_rate(url: str, generator: str, clients: int, n: int, steps: int) -> float:
    """Aggregate proposals per second of `clients` simultaneous requests of n samples."""
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(seed: int) -> int:
            answer = await client.post("/v1/sample", json=sample_body(generator, n, steps, seed))
            answer.raise_for_status()
            return answer.json()["stats"]["proposals"]

        await asyncio.gather(*(one(seed) for seed in range(clients)))  # warm-up: connections
        started = time.perf_counter()
        proposals = await asyncio.gather(*(one(seed) for seed in range(clients)))
        return sum(proposals) / (time.perf_counter() - started)


def raw_digits(url: str, n: int) -> np.ndarray:
    """n raw digits generator samples (method none), (n, 1, 8, 8) float32."""
    parts = []
    with httpx.Client(base_url=url, timeout=600) as client:
        for seed, first in enumerate(range(0, n, 65536)):  # 65536: IMH_MAX_N
            body = {"generator": "digits", "method": "none", "n": min(65536, n - first),
                    "seed": seed, "format": "npy"}  # fmt: skip
            answer = client.post("/v1/sample", json=body)
            answer.raise_for_status()
            parts.append(np.load(io.BytesIO(answer.content)))
    return np.concatenate(parts).astype(np.float32)


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def run_job(client: httpx.Client, submit: Callable[[], httpx.Response]) -> dict:
    """Submit a job, poll until it succeeds; the job JSON plus `client_s`, end to end."""
    started = time.perf_counter()
    answer = submit()
    assert answer.status_code == 201, answer.text[:300]
    job_id = answer.json()["id"]
    while True:
        job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if job["state"] == "succeeded":
            return {**job, "client_s": time.perf_counter() - started}
        assert job["state"] in ("queued", "running"), job
        time.sleep(POLL_S)


def filter_job(client: httpx.Client, candidates: bytes) -> dict:
    spec = {"type": "filter", "discriminator": "digits-d", "method": "imh", "seed": 0}
    return run_job(client, lambda: client.post(
        "/v1/jobs", data={"job": json.dumps(spec)},
        files={"candidates": ("candidates.npy", candidates, "application/x-npy")},
    ))  # fmt: skip


def generate_job(client: httpx.Client, n: int, steps: int) -> dict:
    spec = {"type": "generate", "generator": "digits", "method": "imh", "n": n,
            "steps": steps, "seed": 0}  # fmt: skip
    return run_job(client, lambda: client.post("/v1/jobs", json=spec))


class JobRounds:
    """Jobs on one worker and on two, in rounds ordered 1,2 | 2,1 | 1,2 ... so that the
    second worker starts or stops once per round. A worker that starts runs `warm_up`
    (its first model calls are slow) before anything is measured.

    `jobs`: name -> (submit and wait, items per job). Rates are items per second, in the
    service (created_at to finished_at) and end to end (`client_s`); "cores" is the CPU
    time of every process of the cluster during the job over its end-to-end time.
    """

    def __init__(
        self,
        cluster: Cluster,
        repeats: int,
        jobs: dict[str, tuple[Callable[[], dict], int]],
        warm_up: Callable[[], None],
    ):
        self.results: dict[tuple[str, int, str], list[float]] = {}
        for round_index in range(repeats):
            for workers in (1, 2) if round_index % 2 == 0 else (2, 1):
                while len(cluster.workers) > workers:
                    cluster.remove_worker()
                if len(cluster.workers) < workers:
                    cluster.add_worker()
                    warm_up()
                for name, (run, items) in jobs.items():
                    cpu = cluster.cpu_seconds()
                    job = run()
                    self._add(
                        (name, workers, "cores"), (cluster.cpu_seconds() - cpu) / job["client_s"]
                    )
                    service_s = job["finished_at"] - job["created_at"]
                    self._add((name, workers, "service"), items / service_s)
                    self._add((name, workers, "e2e"), items / job["client_s"])

    def _add(self, key: tuple[str, int, str], value: float) -> None:
        self.results.setdefault(key, []).append(value)

    def ratio(self, name: str, kind: str) -> float:
        """Two workers over one: the median of the ratios within rounds."""
        pairs = zip(self.results[(name, 2, kind)], self.results[(name, 1, kind)], strict=True)
        return statistics.median(a / b for a, b in pairs)

    def cores(self, name: str, workers: int) -> float:
        return statistics.median(self.results[(name, workers, "cores")])

    def rows(self, name: str, label: str, goal: str) -> list[list[object]]:
        rows = []
        for kind, where in (("service", "in the service"), ("e2e", "end to end")):
            two, one = self.results[(name, 2, kind)], self.results[(name, 1, kind)]
            figures = f"{statistics.median(two):,.0f} / {statistics.median(one):,.0f}"
            cores = ""
            if kind == "service":
                cores = f"{self.cores(name, 2):.2f} / {self.cores(name, 1):.2f}"
            rows.append([f"{label}, {where}", figures, self.ratio(name, kind), cores, goal])
        return rows


def reflow(notes: str) -> str:
    """Each "- " item of `notes` as one paragraph wrapped at 90 columns."""
    items = notes.strip().removeprefix("- ").split("\n- ")
    return "\n".join(
        textwrap.fill(" ".join(item.split()), 90, initial_indent="- ", subsequent_indent="  ")
        for item in items
    )


def delete_prefix(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for first in range(0, len(keys), 1000):
            client.delete(*keys[first : first + 1000])
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run; writes nothing")
    args = parser.parse_args()
    quick = args.quick
    torch.set_num_threads(1)  # this process only sends requests; the line in the docs says 1
    repeats, job_repeats = (1, 1) if quick else (9, 6)
    online = {  # generator: (n, steps), one request of about 0.2-1 s
        "toy25": (2048, 10 if quick else 50),
        "digits": (512, 5 if quick else 20),
    }
    clients, client_n, client_steps = 16, 64, 10 if quick else 50
    filter_n = 16384 if quick else 262144  # IMH_FILTER_SHARD_ROWS 4096: 64 shards
    generate_n, generate_steps = (4096, 2) if quick else (8192, 10)  # rows 2048: 4 shards
    prefix = f"bench{secrets.token_hex(4)}"
    redis.Redis.from_url(REDIS_URL).ping()  # fail early, before any process starts

    table: list[list[object]] = []
    online_ratios: dict[str, float] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imh-bench-") as store:
        cluster = Cluster(Path(store), prefix)
        try:
            cluster.add_worker()  # first: a front end is ready only once a worker is alive
            distributed = cluster.start("serve", distributed=True)
            embedded = cluster.start("serve", distributed=False)
            with (
                httpx.Client(base_url=distributed.url, timeout=600) as remote,
                httpx.Client(base_url=embedded.url, timeout=600) as local,
            ):
                for generator, (n, steps) in online.items():
                    for client in (remote, local):
                        http_rate(client, generator, n, 2, 0)  # warm-up: models, groups
                    a = Rounds(
                        repeats,
                        distributed=partial(http_rate, remote, generator, n, steps, 1),
                        embedded=partial(http_rate, local, generator, n, steps, 1),
                    )
                    label = f"(a) {generator}, 1 client, n {n}, {steps} steps"
                    table.append([*a.row(label, "distributed", "embedded", "")[:3], "", GOAL])
                    online_ratios[label] = a.ratio("distributed", "embedded")
                many = partial(concurrent_rate, generator="toy25", clients=clients,
                               n=client_n, steps=client_steps)  # fmt: skip
                a = Rounds(
                    repeats,
                    distributed=lambda: asyncio.run(many(distributed.url)),
                    embedded=lambda: asyncio.run(many(embedded.url)),
                )
                label = f"(a) toy25, {clients} clients x n {client_n}, {client_steps} steps"
                table.append([*a.row(label, "distributed", "embedded", "")[:3], "", GOAL])
                online_ratios[label] = a.ratio("distributed", "embedded")
                a = Rounds(
                    repeats,
                    distributed=partial(request_rate, remote, "toy25", 20),
                    embedded=partial(request_rate, local, "toy25", 20),
                )
                label = "(a) toy25, 1 client, n 16, 1 step: requests (not proposals) per second"
                table.append([*a.row(label, "distributed", "embedded", "")[:3], "", ""])
                extra_ms = 1000 / a["distributed"] - 1000 / a["embedded"]

                digits = raw_digits(embedded.url, filter_n)
                embedded.stop()  # not needed from here on
                candidates, few = npy(digits), npy(digits[:16384])

                def warm_up() -> None:  # enough shards that every worker gets some
                    filter_job(remote, few)
                    generate_job(remote, 8192, 2)

                warm_up()
                jobs = JobRounds(cluster, job_repeats, {
                    "filter": (partial(filter_job, remote, candidates), filter_n),
                    "generate": (partial(generate_job, remote, generate_n, generate_steps),
                                 generate_n),
                }, warm_up)  # fmt: skip
        finally:
            cluster.stop()
            delete_prefix(prefix)
    megabytes = len(candidates) / 2**20
    table += jobs.rows("filter", f"(b) filter job, {filter_n:,} digits candidates "
                       f"({megabytes:.0f} MiB), 2 workers / 1", "")  # fmt: skip
    table += jobs.rows("generate", f"(c) generate job, digits, n {generate_n:,}, "
                       f"{generate_steps} steps, 2 workers / 1", "")  # fmt: skip
    header = ["measure", "per second: (a) proposals, (b) candidates, (c) samples", "ratio",
              "CPU cores busy", "goal"]  # fmt: skip
    text = markdown_table(header, table)
    print(text)
    minutes = (time.perf_counter() - started) / 60
    print(f"{minutes:.1f} minutes")
    if quick:
        return
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    missed = [label.removeprefix("(a) ") for label, r in online_ratios.items() if r < 0.8]
    verdict = (
        f"Goal distributed / embedded {GOAL}: met in all {len(online_ratios)} cases"
        if not missed
        else f"Goal distributed / embedded {GOAL}: missed in {'; '.join(missed)}"
    )
    notes = NOTES.format(
        repeats=repeats,
        job_repeats=job_repeats,
        load=load,
        verdict=verdict,
        filter_cores=jobs.cores("filter", 1),
        generate_cores=jobs.cores("generate", 1),
        generate_ratio=jobs.ratio("generate", "service"),
        filter_ratio=jobs.ratio("filter", "service"),
        extra_ms=extra_ms,
    )
    notes = reflow(notes)
    write_section("BENCHMARKS.md", "distributed", "\n\n".join([
        "## Distributed mode: front end and workers over Redis",
        f"Command: `{COMMAND}` (one run, {minutes:.0f} minutes; every ratio from that run). "
        f"Machine: {machine()}, {os.cpu_count()} CPU cores shared with other work; "
        "IMH_TORCH_THREADS=1 in every server and worker; Redis on the same machine.",
        text, notes]))  # fmt: skip


NOTES = """\
- {verdict}. Two workers on this machine: filter jobs {filter_ratio:.2f}x, generate jobs
  {generate_ratio:.2f}x the rate of one (the machine's two cores are the limit; below).
- Models: the zoo's `toy25` and `digits` generators with their default discriminators
  (`toy25-d`, `digits-d`). Online requests: method imh, chains started as the method's
  default. Every process (servers, workers) runs one torch thread; Redis runs here too.
- (a) times one `POST /v1/sample` at the client against a distributed front end with one
  worker and against an embedded server, both up side by side (each idle while the other
  is measured). Figures are medians over {repeats} rounds; a ratio is the median of the
  ratios within rounds, whose two sides ran moments apart, in alternating order. The
  distributed path adds a Redis message to the worker and the samples back through the
  request's event stream: {extra_ms:.1f} ms per request (the tiny-request row, medians)
  and a copy of the samples; in exchange the front end's HTTP and JSON work runs in
  another process than the sampling, where the embedded server shares one interpreter
  between them. 16 concurrent clients (httpx.AsyncClient, one process) put 16 messages on
  the stream; the worker batches them as the embedded scheduler does, and each request
  pays its Redis round trip on both sides.
- (b) and (c): jobs submitted to the front end, polled every 50 ms until succeeded; "in
  the service" is created_at to finished_at of the job, "end to end" runs from the start
  of the upload (filter) or POST (generate) to the poll that sees the job done. Rounds of
  1 and 2 workers alternate ({job_repeats} of each); a worker that starts runs a warm-up
  job first. IMH_FILTER_SHARD_ROWS=4096 (64 shards), IMH_JOB_SHARD_ROWS=2048. "CPU cores
  busy": CPU time of the front end, the workers and Redis during a job over its
  end-to-end time (2 workers / 1), read from /proc.
- (b) gains {filter_ratio:.2f}x, and the cores column says why: one worker alone already
  keeps {filter_cores:.1f} of the 2 cores busy. A worker runs IMH_WORKER_SHARD_SLOTS=2
  shards at once and each scores its candidates in its own thread, so a single worker
  scores on both cores; the front end and Redis take the rest. A second worker finds no
  idle core. End to end adds the upload: the front end reads the multipart file, checks
  it and writes the shards to Redis before created_at, in one process whatever the
  number of workers. Workers on machines of their own (or GPUs) add their cores; that
  cannot be shown here.
- (c) gains {generate_ratio:.2f}x: generate shards run through the worker's engine, one
  scheduler thread, so one worker keeps {generate_cores:.1f} core busy and a second worker
  can take the second core, as long as no other work holds it. (c)'s proposals per
  second (n x (steps + 1) over the time) are below (a)'s digits row, in part because a
  worker steps its two 2048-row shards together, and on one thread the digits models cost
  more per row at a few thousand rows than at 512 (about 9,500 against 14,000 proposals
  per second through HTTP, in a separate check).
- The machine is shared: load average {load} (1, 5, 15 min) when the run ended. Absolute
  rates move with that load between runs; ratios much less.
"""


if __name__ == "__main__":
    main()
