"""Compiled models (IMH_COMPILE=1) against eager, through HTTP on real `imh serve` processes.

Run:  .venv/bin/python -m benchmarks.compiled           (15-25 minutes on 2 busy cores)
      .venv/bin/python -m benchmarks.compiled --quick   (smoke check, figures not written)
      .venv/bin/python -m benchmarks.compiled --design  (in-process: static padded buckets
                                                         against a dynamic batch dimension)

Two servers over the zoo, IMH_TORCH_THREADS=1, side by side: eager (IMH_COMPILE=0) and
compiled (IMH_COMPILE=1, a fresh inductor cache, so its start compiles from scratch).

(a) Start: seconds until /readyz answers 200, eager and compiled (cold inductor cache,
    then a second compiled start on the cache the first one filled), and the memory of
    each server with its child processes (inductor's compile workers).
(b) First request after start (digits, imh, n = 256, 20 steps) and the one after it.
(c) Proposals per second of one POST /v1/sample, compiled over eager, in interleaved
    rounds: digits and toy25 (and fashion where the zoo has it), imh at n = 256 and
    4096 and a stream of 256 chains, mala (gradients through G and D) at 256 and 4096.
(d) Same seed on both servers: rows whose samples differ beyond 1e-4 (relative).
(e) What each server says in /v1/models: compiled or not, and where it runs eager.

Every ratio comes from one run: a ratio is the median over rounds of the ratio within a
round, whose two sides ran moments apart. Writes docs/BENCHMARKS.md, section "compiled".
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from benchmarks.processes import Process
from benchmarks.report import machine, markdown_table, write_section
from service.models.registry import ZOO_STORE

COMMAND = ".venv/bin/python -m benchmarks.compiled"


def server(store: Path, compile: bool, cache: Path, threads: int) -> Process:
    env = {
        **os.environ, "IMH_MODEL_STORE": str(store), "IMH_LOG_LEVEL": "warning",
        "IMH_TORCH_THREADS": str(threads), "IMH_COMPILE": "1" if compile else "0",
        "IMH_BATCH_WAIT_MS": "2", "TORCHINDUCTOR_CACHE_DIR": str(cache),
    }  # fmt: skip
    return Process("serve", env, timeout_s=3600)


def started(store: Path, compile: bool, cache: Path, threads: int) -> tuple[Process, float]:
    begin = time.monotonic()
    process = server(store, compile, cache, threads)
    return process, time.monotonic() - begin


def memory_mib(pid: int) -> float:
    """Resident memory of a process and its descendants (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line for line in status.splitlines() if line.startswith("VmRSS"))
                         .split()[1])  # fmt: skip
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


def body(generator: str, method: str, n: int, steps: int, seed: int, stream: bool) -> dict:
    params: dict = {"init": "generator"} if method == "imh" else {"step_size": 0.01}
    if stream:
        params |= {"mode": "stream", "chains": 256}
    return {"generator": generator, "method": method, "n": n, "steps": steps, "seed": seed,
            "params": params}  # fmt: skip


def rate(client: httpx.Client, request: dict) -> float:
    """Proposals per second of one request, timed at the client."""
    begin = time.perf_counter()
    answer = client.post("/v1/sample", json=request)
    answer.raise_for_status()
    return answer.json()["stats"]["proposals"] / (time.perf_counter() - begin)


def samples(client: httpx.Client, request: dict) -> np.ndarray:
    answer = client.post("/v1/sample", json=request)
    answer.raise_for_status()
    return np.asarray(answer.json()["samples"], dtype=np.float64)


def rounds(clients: dict[str, httpx.Client], request: dict, repeats: int) -> dict:
    """Both servers `repeats` times, order alternating; rates and the median ratio."""
    for client in clients.values():
        rate(client, {**request, "steps": 1})  # the group's thread starts
    got: dict[str, list[float]] = {name: [] for name in clients}
    for index in range(repeats):
        order = list(clients) if index % 2 == 0 else list(reversed(clients))
        for name in order:
            got[name].append(rate(clients[name], {**request, "seed": index}))
    ratio = statistics.median(c / e for c, e in zip(got["compiled"], got["eager"], strict=True))
    return {"compiled": statistics.median(got["compiled"]),
            "eager": statistics.median(got["eager"]), "ratio": ratio}  # fmt: skip


def models_table(client: httpx.Client, names: set[str]) -> list[list[object]]:
    rows = []
    for model in client.get("/v1/models").json()["models"]:
        if model["name"] in names:
            note = model["compile_note"] or ("" if model["compiled"] else "")
            rows.append([model["name"], model["kind"], "yes" if model["compiled"] else "no", note])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run; writes nothing")
    parser.add_argument("--design", action="store_true", help="buckets against dynamic batch")
    parser.add_argument("--threads", type=int, default=1, help="IMH_TORCH_THREADS")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.design:
        design(args.quick)
        return
    quick = args.quick
    repeats = 1 if quick else 5
    zoo = {p.name for p in ZOO_STORE.iterdir()}
    generators = [name for name in ("digits", "fashion", "toy25") if name in zoo]
    steps = {"digits": 20, "fashion": 10, "toy25": 50}
    if quick:
        steps = dict.fromkeys(steps, 2)
    table: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="imh-bench-") as folder:
        store, cache = Path(folder) / "store", Path(folder) / "inductor"
        store.mkdir()
        eager, eager_s = started(store, False, cache, args.threads)
        compiled, cold_s = started(store, True, cache, args.threads)
        compiled.stop()
        compiled, warm_s = started(store, True, cache, args.threads)
        memory = {"eager": memory_mib(eager.process.pid),
                  "compiled": memory_mib(compiled.process.pid)}  # fmt: skip
        start_rows = [
            ["(a) start to ready, eager", f"{eager_s:.1f} s", "", ""],
            ["(a) start to ready, compiled, cold inductor cache", f"{cold_s:.1f} s",
             f"{cold_s / eager_s:.1f}", ""],
            ["(a) start to ready, compiled, inductor cache from the start above",
             f"{warm_s:.1f} s", f"{warm_s / eager_s:.1f}", ""],
            ["(a) resident memory after start, with child processes (compiled / eager)",
             f"{memory['compiled']:.0f} / {memory['eager']:.0f} MiB",
             f"{memory['compiled'] / memory['eager']:.2f}", ""],
        ]  # fmt: skip
        with (
            httpx.Client(base_url=eager.url, timeout=1800) as eager_client,
            httpx.Client(base_url=compiled.url, timeout=1800) as compiled_client,
        ):
            clients = {"eager": eager_client, "compiled": compiled_client}
            first = body("digits", "imh", 256, 20, 0, False)
            for name, client in clients.items():
                begin = time.perf_counter()
                rate(client, first)
                once = time.perf_counter() - begin
                begin = time.perf_counter()
                rate(client, {**first, "seed": 1})
                again = time.perf_counter() - begin
                start_rows.append([
                    f"(b) first request after start, {name} (digits, imh, n 256, 20 steps); "
                    "then the second", f"{once * 1000:.0f} ms; {again * 1000:.0f} ms", "", "",
                ])  # fmt: skip
            table += start_rows
            cases = []
            for generator in list(generators):  # a zoo model being rebuilt may not load
                answers = [c.post("/v1/sample", json=body(generator, "imh", 16, 1, 0, False))
                           for c in clients.values()]  # fmt: skip
                if any(answer.status_code != 200 for answer in answers):
                    generators.remove(generator)
                    detail = next(a for a in answers if a.status_code != 200).text[:160]
                    table.append([f"(c) {generator}: not measured", detail, "", ""])
            for generator in generators:
                k = steps[generator]
                cases += [
                    (generator, "imh", 256, k, False), (generator, "imh", 4096, k, False),
                    (generator, "imh", 256 if quick else 2048, k, True),
                    (generator, "mala", 256, max(2, k // 2), False),
                    (generator, "mala", 4096, max(2, k // 4), False),
                ]  # fmt: skip
            for generator, method, n, k, stream in cases:
                request = body(generator, method, n, k, 0, stream)
                got = rounds(clients, request, repeats)
                shape = f"stream of 256 chains, n {n}" if stream else f"n {n}"
                goal = {"digits": ">= 1.4", "fashion": ">= 1.4", "toy25": ">= 1.0"}[generator]
                table.append([f"(c) {generator}, {method}, {shape}, {k} steps",
                              f"{got['compiled']:,.0f} / {got['eager']:,.0f}", got["ratio"],
                              goal])  # fmt: skip
            for generator, method, n, k in [("digits", "imh", 4096, steps["digits"]),
                                            ("digits", "mala", 256, steps["digits"])]:  # fmt: skip
                request = body(generator, method, n, k, 11, False)
                ours, theirs = samples(compiled_client, request), samples(eager_client, request)
                close = np.isclose(ours, theirs, rtol=1e-4, atol=1e-5).reshape(n, -1).all(1)
                gap = np.abs(ours - theirs).max()
                table.append([f"(d) same seed, {generator}, {method}, n {n}, {k} steps: rows "
                              "beyond 1e-4", f"{int((~close).sum())} of {n} (largest gap "
                              f"{gap:.2g})", "", ""])  # fmt: skip
            shown = {
                "digits",
                "digits-d",
                "digits-pair",
                "digits-proposal",
                "digits-features",
                "toy25",
                "toy25-d",
                "toy25-pair",
                "inception",
                "fashion",
                "fashion-d",
            }
            models = models_table(compiled_client, shown)
        eager.stop()
        compiled.stop()
    text = markdown_table(["measure", "compiled / eager (proposals per second)", "ratio", "goal"],
                          table)  # fmt: skip
    model_text = markdown_table(["model", "kind", "compiled", "where eager, and why"], models)
    print(text, "\n\n", model_text)
    if not quick:
        load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
        design_text = design(quick=False)
        write_section("BENCHMARKS.md", "compiled", "\n\n".join([
            "## Compiled models (IMH_COMPILE=1) against eager",
            f"Command: `{COMMAND}` (one run; every ratio from that run). Machine: {machine()}; "
            f"IMH_TORCH_THREADS={args.threads} in both servers; load average {load} when the "
            "servers stopped.", text, "What the compiled server said in `/v1/models` "
            "(speed-up over eager at each warm-up size, timed at load; `eager` marks sizes "
            "that stay eager; empty: compiled at every size):", model_text,
            "Why a dynamic batch dimension rather than padded buckets (`--design`, "
            "in-process, digits G then D, one thread, speed-up over eager; a padded call "
            "runs the power-of-two bucket at or above its rows):", design_text, NOTES,
        ]))  # fmt: skip


NOTES = """\
- The compiled server compiles each generator, discriminator, pair, proposal and features
  model at load with a dynamic batch dimension, checks it against eager and times both
  at 16, 256 and 4096 rows in each autograd mode; a call runs compiled where compiled was
  at least 1.1x faster at the nearest warm-up size, eager elsewhere
  (`service/models/compiled.py`). Classifiers stay eager.
- (a) "cold": a fresh inductor cache (TORCHINDUCTOR_CACHE_DIR), as on a new machine or
  container; the second start reuses what the first compiled. Timing at load is part of
  both. (b) the compiled server compiled at load, so its first request pays nothing
  extra; without warm-up it would wait for the compiler.
- (c) client-timed `POST /v1/sample` (HTTP, chain start and JSON included); imh starts
  at generator samples, mala uses step_size 0.01 (no warm-up phase). The stream rows use
  `params.mode = "stream"` with 256 chains, collected into one answer.
- (d) same request and seed on both servers. Compiled kernels round differently from
  eager (a few ulps per call); imh keeps that difference, mala carries it along the chain.
"""


def design(quick: bool) -> str:
    """Static shapes padded to power-of-two buckets against one dynamic-batch compile:
    compile times (cold cache) and speed-ups over eager for the digits G+D, in-process."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64
    sizes = [16, 100, 256] if quick else [16, 100, 256, 1000, 3000, 4096]
    repeats = 1 if quick else 5
    table = []
    for kind in ("inference", "gradients"):
        with tempfile.TemporaryDirectory(prefix="imh-inductor-") as cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            torch._dynamo.reset()
            torch.compile(lambda x: x.sin() + 1)(torch.ones(3))  # the process's first compile
            table += _design_rows(kind, sizes, repeats)
    header = ["mode", "rows", "bucket", "eager ms", "static, padded: speed-up",
              "dynamic: speed-up"]  # fmt: skip
    text = markdown_table(header, table)
    print(text)
    return text


def _digits_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    from service.models.loading import load_model

    cpu = torch.device("cpu")
    g = load_model(ZOO_STORE / "digits" / "1", "digits", "1", "zoo", cpu).module
    d = load_model(ZOO_STORE / "digits-d" / "1", "digits-d", "1", "zoo", cpu).module
    for parameter in [*g.parameters(), *d.parameters()]:
        parameter.requires_grad_(False)
    return g, d


def _runner(kind: str, g, d, mark: bool):
    def run(z: torch.Tensor) -> torch.Tensor:
        if kind == "inference":
            with torch.inference_mode():
                if mark:
                    torch._dynamo.mark_dynamic(z, 0)
                return d(g(z))
        z = z.clone().requires_grad_(True)
        if mark:
            torch._dynamo.mark_dynamic(z, 0)
        return torch.autograd.grad(d(g(z)).sum(), z)[0]

    return run


def _bucket(rows: int) -> int:
    return 1 << (rows - 1).bit_length()


def _design_rows(kind: str, sizes: list[int], repeats: int) -> list[list[object]]:
    eager = _runner(kind, *_digits_pair(), False)
    g, d = _digits_pair()
    static = _runner(kind, torch.compile(g, dynamic=False), torch.compile(d, dynamic=False), False)
    g, d = _digits_pair()
    dynamic = _runner(kind, torch.compile(g), torch.compile(d), True)
    begin = time.perf_counter()
    for n in sizes:
        dynamic(torch.randn(n, 16))
    dynamic_s = time.perf_counter() - begin
    static_s = []
    for bucket in sorted({_bucket(n) for n in sizes}):
        begin = time.perf_counter()
        static(torch.randn(bucket, 16))
        static_s.append(time.perf_counter() - begin)
    got: dict = {}
    for _ in range(repeats):
        for n in sizes:
            z, padded = torch.randn(n, 16), torch.randn(_bucket(n), 16)
            sides = [("eager", eager, z), ("static", static, padded), ("dynamic", dynamic, z)]
            random.shuffle(sides)
            reps = max(1, 1024 // n)
            for name, fn, x in sides:
                begin = time.perf_counter()
                for _ in range(reps):
                    fn(x)
                got.setdefault((name, n), []).append((time.perf_counter() - begin) / reps)
    rows: list[list[object]] = []
    for n in sizes:
        e = statistics.median(got[("eager", n)])
        rows.append([kind, n, _bucket(n), f"{e * 1000:.2f}",
                     e / statistics.median(got[("static", n)]),
                     e / statistics.median(got[("dynamic", n)])])  # fmt: skip
    rows.append([
        kind, "compile, cold cache", "", "",
        f"{statistics.mean(static_s):.1f} s per bucket ({len(static_s)} buckets)",
        f"{dynamic_s:.1f} s, once",
    ])  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
