"""Fairness: how long a small request waits while a large one of the same group runs.

Run:  .venv/bin/python -m benchmarks.fairness           (about 3 minutes on 2 cores)
      .venv/bin/python -m benchmarks.fairness --quick   (smoke check, figures not written)

For toy25 and digits (imh, same generator and discriminator: one scheduler group), an
n = 16 request (20 steps) is timed through HTTP when the server is idle, then while an
n = 65,536 request (imh, 3,000 steps: it runs far longer than the measurement) steps,
and while a generate job of the same model runs. The goal: the small request answers
within 3x its idle latency plus one step of the large request (one batch of
IMH_MAX_BATCH_SIZE rows; its time is measured alone, from a short large request).

Embedded mode (one `imh serve`) and distributed mode (`imh serve` + one `imh worker`
over Redis at IMH_REDIS_URL, default redis://127.0.0.1:6379/0). Every process runs with
IMH_TORCH_THREADS=1. Writes docs/BENCHMARKS.md, section "fairness".
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import threading
import time
from contextlib import ExitStack, suppress

import httpx

from benchmarks.processes import Process
from benchmarks.report import machine, markdown_table, write_section

COMMAND = ".venv/bin/python -m benchmarks.fairness"
REDIS_URL = os.environ.get("IMH_REDIS_URL", "redis://127.0.0.1:6379/0")
JOB_TOKEN = {"X-IMH-Job-Token": "fairness-benchmark-token"}


def small_latency(url: str, generator: str, repeats: int) -> float:
    """Median seconds of an n = 16 request (20 steps, its own seeds)."""
    times = []
    for seed in range(repeats):
        body = {"generator": generator, "n": 16, "steps": 20, "seed": seed}
        started = time.perf_counter()
        answer = httpx.post(f"{url}/v1/sample", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def step_seconds(url: str, generator: str, n: int, batch: int = 4096) -> float:
    """Seconds of one engine step of the large request (one batch of its rows), from a
    short large request alone."""
    steps = 5
    body = {"generator": generator, "n": n, "steps": steps, "seed": 98}
    answer = httpx.post(f"{url}/v1/sample", json=body, timeout=600)
    assert answer.status_code == 200, answer.text
    batches = steps * -(-n // batch)
    return answer.json()["stats"]["seconds"] / batches


class Background:
    """A large request (or job) running in a thread until stopped."""

    def __init__(self, url: str, generator: str, kind: str, n: int):
        self.url, self.stop = url, threading.Event()
        if kind == "request":
            body = {"generator": generator, "n": n, "steps": 3000, "seed": 99}
            self.thread = threading.Thread(target=self._request, args=(body,), daemon=True)
        else:
            body = {"type": "generate", "generator": generator, "n": n, "steps": 200}
            self.thread = threading.Thread(target=self._job, args=(body,), daemon=True)
        self.thread.start()
        time.sleep(2.0)  # let it reach the device

    def _request(self, body: dict) -> None:
        with suppress(httpx.TimeoutException, httpx.TransportError):
            answer = httpx.post(f"{self.url}/v1/sample", json=body, timeout=httpx.Timeout(600))
            if not self.stop.is_set():  # after the measurement the server stops under it
                raise AssertionError(f"the large request ended early: {answer.text[:300]}")

    def _job(self, body: dict) -> None:
        answer = httpx.post(f"{self.url}/v1/jobs", json=body, headers=JOB_TOKEN)
        assert answer.status_code == 201, answer.text
        job = answer.json()
        self.stop.wait()
        httpx.delete(f"{self.url}/v1/jobs/{job['id']}", headers=JOB_TOKEN)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=1)  # the request is abandoned: its client stops reading


def measure(url: str, generator: str, big_n: int, repeats: int) -> list[dict]:
    idle = small_latency(url, generator, repeats)
    step = step_seconds(url, generator, big_n)
    rows = []
    for kind in ("request", "job"):
        background = Background(url, generator, kind, big_n)
        try:
            busy = small_latency(url, generator, repeats)
        finally:
            background.close()
        bound = 3 * idle + step
        rows.append({"generator": generator, "while": f"n = {big_n} {kind}", "idle": idle,
                     "busy": busy, "step": step, "bound": bound, "ok": busy <= bound})  # fmt: skip
        time.sleep(3.0)  # the abandoned work ends (its client left, or the job was deleted)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    big_n, repeats = (4096, 3) if args.quick else (65536, 7)
    env = {**os.environ, "IMH_LOG_LEVEL": "warning", "IMH_TORCH_THREADS": "1",
           "IMH_MAX_JOB_N": str(big_n)}  # fmt: skip
    rows: list[dict] = []
    for mode in ("embedded", "distributed"):
        with ExitStack() as stack:
            mode_env = dict(env)
            if mode == "distributed":
                mode_env |= {"IMH_REDIS_URL": REDIS_URL,
                             "IMH_REDIS_PREFIX": f"fair{secrets.token_hex(3)}"}  # fmt: skip
                stack.enter_context(Process("worker", mode_env))
            server = stack.enter_context(Process("serve", mode_env))
            for generator in ("toy25", "digits"):
                for row in measure(server.url, generator, big_n, repeats):
                    rows.append({"mode": mode, **row})
                    print(rows[-1])
    if args.quick:
        return
    table = markdown_table(
        ["mode", "model", "while", "n = 16 idle (ms)", "n = 16 busy (ms)", "big step (ms)",
         "goal: 3 x idle + step (ms)", "met"],
        [[r["mode"], r["generator"], r["while"], f"{1000 * r['idle']:.0f}",
          f"{1000 * r['busy']:.0f}", f"{1000 * r['step']:.0f}", f"{1000 * r['bound']:.0f}",
          "yes" if r["ok"] else "no"] for r in rows],
    )  # fmt: skip
    worst = max(rows, key=lambda r: r["busy"] / r["idle"])
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    reading = (
        f"Every row is also within 3x its idle latency alone: the worst, {worst['mode']} "
        f"{worst['generator']} while an {worst['while']} runs, at "
        f"{worst['busy'] / worst['idle']:.2f}x. A big step is one batch of the large "
        "request's rows as the engine ran it here, its wall time on the shared machine "
        f"(load average {load} when the run ended)."
    )
    write_section(
        "BENCHMARKS.md",
        "fairness",
        f"""## Fairness: a small request while a large one runs

`{COMMAND}` ({machine()}). An n = 16 request (imh, 20 steps, median of {repeats}) of the
same scheduler group as an n = {big_n} request (3,000 steps) or a generate job of the same
model: requests of at most IMH_INTERACTIVE_ROWS chains step in their own lane (thread),
job shards and large requests in the bulk lane, and within a lane every step shares the
batch between the requests that waited longest. Goal: within 3x the idle latency plus
one step of the large request.

{table}

{reading}
""",
    )


if __name__ == "__main__":
    main()
