"""Serving overhead and batching gains, measured through HTTP against a real `imh serve`.

Run:  .venv/bin/python -m benchmarks.serve          (a few minutes on 2 cores)
      .venv/bin/python -m benchmarks.serve --quick  (smoke check, figures not written)

(a) IMH proposals per second through HTTP (one POST /v1/sample of n = batch rows, K steps)
    over the kernel's proposals per second in-process (the same models, `kernel.step` on
    the same batch size), for the toy and the digits model pair.
(b) 32 concurrent clients asking for 64 samples each versus one client asking for 2048
    (aggregate proposals per second), and versus the same 32 clients against a second
    server with IMH_MAX_BATCH_SIZE=64, where every request steps alone.
(c) Time from sending POST /v1/sample/stream to the first `samples` event.

Models: the zoo's "toy25" and "digits" generators with their default discriminators when
they are in zoo/store; otherwise stand-ins of the same shape with random weights (speed
does not depend on training), written to a temporary store. Every ratio comes from one
run. Writes docs/BENCHMARKS.md, section "serve".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import httpx
import torch
from torch import nn

from benchmarks.processes import Process
from benchmarks.report import machine, markdown_table, write_section
from samplers import Noise
from samplers.methods import prepare
from service.models.registry import ZOO_STORE, Registry
from service.online.plan import build_models
from service.online.resolve import Limits, resolve
from service.online.schemas import SampleCreate
from service.settings import Settings

COMMAND = ".venv/bin/python -m benchmarks.serve"


class DigitsGenerator(nn.Module):
    """A small DCGAN generator for 1x8x8 images (stand-in for the zoo's digits model)."""

    def __init__(self, latent_dim: int = 16, width: int = 64):
        super().__init__()
        self.width = width
        self.project = nn.Linear(latent_dim, width * 2 * 2)
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1),  # 2 -> 4
            nn.ReLU(),
            nn.ConvTranspose2d(width // 2, 1, 4, stride=2, padding=1),  # 4 -> 8
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).reshape(z.shape[0], self.width, 2, 2))


def stand_in_store(store: Path) -> dict[str, str]:
    """Write the stand-ins the zoo lacks; returns {"toy": generator, "digits": generator}."""
    from architectures import save_weights

    names = {}
    zoo = {p.name for p in ZOO_STORE.iterdir()} if ZOO_STORE.is_dir() else set()
    if {"toy25", "toy25-d"} <= zoo:
        names["toy"] = "toy25"
    else:
        from discriminators.architectures import MLPDiscriminator
        from zoo.toy25 import Generator

        _zoo_model(store, "bench-toy", Generator(2, 100, 4), "zoo.toy25:Generator",
                   {"latent_dim": 2, "width": 100, "depth": 4},
                   {"kind": "generator", "latent_dim": 2, "sample_shape": [2],
                    "discriminator": "bench-toy-d"}, save_weights)  # fmt: skip
        _zoo_model(store, "bench-toy-d", MLPDiscriminator(2, 100, 4),
                   "discriminators.architectures:MLPDiscriminator",
                   {"input_dim": 2, "width": 100, "depth": 4},
                   {"kind": "discriminator", "generator": "bench-toy"}, save_weights)  # fmt: skip
        names["toy"] = "bench-toy"
    if {"digits", "digits-d"} <= zoo:
        names["digits"] = "digits"
    else:
        from discriminators.architectures import ConvDiscriminator

        folder = store / "bench-digits" / "1"
        folder.mkdir(parents=True, exist_ok=True)
        program = torch.export.export(
            DigitsGenerator().eval(), (torch.randn(4, 16),),
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )  # fmt: skip
        torch.export.save(program, str(folder / "generator.pt2"))
        (folder / "manifest.json").write_text(json.dumps({
            "kind": "generator", "format": "torch.export", "file": "generator.pt2",
            "latent_dim": 16, "sample_shape": [1, 8, 8], "discriminator": "bench-digits-d",
        }))  # fmt: skip
        _zoo_model(store, "bench-digits-d", ConvDiscriminator(1, 8, 64),
                   "discriminators.architectures:ConvDiscriminator",
                   {"channels": 1, "size": 8, "width": 64},
                   {"kind": "discriminator", "generator": "bench-digits"},
                   save_weights)  # fmt: skip
        names["digits"] = "bench-digits"
    return names


def _zoo_model(store, name, module, architecture, config, manifest, save_weights) -> None:
    folder = store / name / "1"
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(module, folder / "weights.safetensors")
    manifest = {"format": "zoo", "architecture": architecture, "config": config,
                "weights": "weights.safetensors", **manifest}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))


def Server(store: Path, **settings: str) -> Process:  # noqa: N802 - reads as a class
    """`imh serve` over `store` with IMH_* settings, on a free port; stopped on exit."""
    env = {**os.environ, "IMH_MODEL_STORE": str(store), "IMH_LOG_LEVEL": "warning",
           **{f"IMH_{k.upper()}": str(v) for k, v in settings.items()}}  # fmt: skip
    return Process("serve", env)


def body(generator: str, n: int, steps: int, seed: int = 0) -> dict:
    # init "generator": every method variant starts the same way in-process and over HTTP.
    return {"generator": generator, "method": "imh", "n": n, "steps": steps, "seed": seed,
            "params": {"init": "generator"}}  # fmt: skip


def http_rate(client: httpx.Client, generator: str, rows: int, steps: int, seed: int) -> float:
    """Proposals per second of one POST /v1/sample, timed at the client."""
    started = time.perf_counter()
    answer = client.post("/v1/sample", json=body(generator, rows, steps, seed))
    answer.raise_for_status()
    return answer.json()["stats"]["proposals"] / (time.perf_counter() - started)


def kernel_rate(registry: Registry, generator: str, rows: int, steps: int, seed: int) -> float:
    """Proposals per second of kernel.step in this process, same models and batch size."""
    limits = Limits.from_settings(Settings())
    resolved = resolve(registry, SampleCreate(**body(generator, rows, steps)), 0, False, limits)
    noise = Noise.seeded(seed, rows)
    kernel, state = prepare("imh", build_models(resolved), {"init": "generator"}, noise)
    kernel.step(state, noise)  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        state, _ = kernel.step(state, noise)
    return rows * steps / (time.perf_counter() - started)


class Rounds:
    """Measures run back to back in `repeats` rounds, their order alternating.

    The machine is shared, so load from other work comes and goes within seconds. A
    ratio is the median over rounds of the ratio within a round, whose two sides ran
    moments apart; figures are medians over rounds.
    """

    def __init__(self, repeats: int, **measures):
        self.results: dict[str, list[float]] = {name: [] for name in measures}
        for round_index in range(repeats):
            names = list(measures) if round_index % 2 == 0 else list(reversed(measures))
            for name in names:
                self.results[name].append(measures[name]())

    def __getitem__(self, name: str) -> float:
        return statistics.median(self.results[name])

    def ratio(self, top: str, bottom: str) -> float:
        return statistics.median(
            a / b for a, b in zip(self.results[top], self.results[bottom], strict=True)
        )

    def row(self, label: str, top: str, bottom: str, goal: str) -> list[object]:
        return [label, f"{self[top]:,.0f} / {self[bottom]:,.0f}", self.ratio(top, bottom), goal]


async def post(url: str, payload: dict) -> dict:
    """POST JSON over a bare asyncio connection: the client's own cost stays far below
    the server's, so 32 clients in one process measure the server, not a client library."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    content = json.dumps(payload).encode()
    writer.write(
        b"POST /v1/sample HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(content), content)
    )
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, answer = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:300]
    return json.loads(answer)


async def concurrent_rate(url: str, generator: str, clients: int, n: int, steps: int) -> float:
    """Aggregate proposals per second of `clients` simultaneous requests of n samples."""
    await post(url, body(generator, n, 2))  # warm-up
    started = time.perf_counter()
    answers = await asyncio.gather(
        *(post(url, body(generator, n, steps, seed)) for seed in range(clients))
    )
    seconds = time.perf_counter() - started
    return sum(answer["stats"]["proposals"] for answer in answers) / seconds


def first_sample_seconds(url: str, generator: str, repeats: int) -> list[float]:
    times = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for seed in range(repeats):
            request = {
                **body(generator, 64, 200, seed),
                "params": {"chains": 64, "init": "generator"},
            }
            started = time.perf_counter()
            with client.stream("POST", "/v1/sample/stream", json=request) as response:
                for line in response.iter_lines():
                    if line == "event: samples":
                        times.append(time.perf_counter() - started)
                        break
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run; writes nothing")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads here and in the servers (IMH_TORCH_THREADS)",
    )
    args = parser.parse_args()  # fmt: skip
    torch.set_num_threads(args.threads)
    quick, repeats = args.quick, 1 if args.quick else 9
    steps = {"toy": 10 if quick else 200, "digits": 5 if quick else 200}
    rows = {"toy": 2048, "digits": 256}
    short = 10 if quick else 50  # (b) again with short requests
    table: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="imh-bench-") as folder:
        store = Path(folder)
        names = stand_in_store(store)
        toy = names["toy"]
        registry = Registry(torch.device("cpu"))
        registry.load_store(ZOO_STORE, "zoo")
        registry.load_store(store, "store")
        settings = {"batch_wait_ms": 2, "torch_threads": args.threads}
        # Both servers run side by side (idle while the other is measured), so each round
        # of (b) compares batching on and off moments apart.
        with (
            Server(store, max_batch_size=4096, **settings) as server,
            Server(store, max_batch_size=64, **settings) as unbatched,
            httpx.Client(base_url=server.url, timeout=600) as client,
        ):
            for label in ("toy", "digits"):
                name, size, k = names[label], rows[label], steps[label]
                http_rate(client, name, size, 2, 0)  # warm-up: the group starts
                a = Rounds(
                    repeats,
                    http=partial(http_rate, client, name, size, k, 1),
                    kernel=partial(kernel_rate, registry, name, size, k, 1),
                )
                label = f"(a) {label} ({name}): HTTP / in-process kernel, batch {size}, {k} steps"
                table.append(a.row(label, "http", "kernel", ">= 0.9"))
            for k in (steps["toy"], short):
                b = Rounds(
                    repeats,
                    many=lambda k=k: asyncio.run(concurrent_rate(server.url, toy, 32, 64, k)),
                    one=lambda k=k: asyncio.run(concurrent_rate(server.url, toy, 1, 2048, k)),
                    alone=lambda k=k: asyncio.run(concurrent_rate(unbatched.url, toy, 32, 64, k)),
                )
                table += [
                    b.row(f"(b) toy, {k} steps: 32 clients x 64 samples / 1 client x 2048",
                          "many", "one", ">= 0.8"),
                    b.row(f"(b) toy, {k} steps: 32 clients x 64, batching on / off "
                          "(IMH_MAX_BATCH_SIZE 4096 / 64)", "many", "alone", ">= 5"),
                ]  # fmt: skip
            first = first_sample_seconds(server.url, toy, 3 if quick else 10)
    ceiling = Rounds(
        repeats,
        large=partial(kernel_rate, registry, toy, 2048, steps["toy"], 1),
        small=partial(kernel_rate, registry, toy, 64, steps["toy"], 1),
    )
    table += [
        ceiling.row("ceiling for (b): in-process kernel alone, batch 2048 / batch 64 (toy)",
                    "large", "small", ""),
        [f"(c) time to first streamed sample (toy, 64 chains), median of {len(first)}",
         f"{statistics.median(first) * 1000:.0f} ms (min {min(first) * 1000:.0f}, "
         f"max {max(first) * 1000:.0f})", "", ""],
    ]  # fmt: skip
    text = markdown_table(["measure", "proposals per second", "ratio", "goal"], table)
    print(text)
    if not quick:
        load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
        notes = NOTES.format(
            models=describe(names),
            ceiling=ceiling.ratio("large", "small"),
            threads=args.threads,
            load=load,
        )
        write_section("BENCHMARKS.md", "serve", "\n\n".join([
            "## Serving: HTTP overhead and batching",
            f"Command: `{COMMAND}` (one run; every ratio from that run). Machine: {machine()}; "
            f"torch threads {args.threads} in this process and in the servers.",
            text, notes]))  # fmt: skip


NOTES = """\
- Models: {models}
  Speed does not depend on training. Method imh, chains started at generator samples,
  calibration as the discriminator's manifest says.
- (a) times one `POST /v1/sample` at the client (HTTP, validation, chain start, JSON
  encoding) against `kernel.step` alone on the same models and batch size in this
  process, {threads} torch thread(s) on both sides. Figures are medians over 9 rounds;
  a ratio is the median of the ratios within rounds, whose sides ran moments apart. The
  HTTP side adds one generator and discriminator pass to start the chains (1/K of the
  work), JSON encoding and about 2 ms of batch wait to the K steps: a few percent in all.
  A ratio a little under its goal is within the run-to-run spread (last item).
- (b) the clients use bare asyncio connections, so the client library's own cost does not
  count. The 32 requests reach the scheduler within about 10 ms and step as one batch;
  what separates them from one request of 2048 is per-request work on the event loop
  (HTTP, validation, JSON for 32 requests instead of one), which competes with the
  scheduler thread for the CPU. Its share shrinks as requests carry more steps (compare
  the 50- and 200-step rows). Batching off: a second server with IMH_MAX_BATCH_SIZE=64,
  where each 64-row request steps alone; both servers run side by side, so each round
  compares on and off moments apart.
- Goal missed: batching on/off >= 5x. On one CPU thread the kernel's cost is nearly linear
  in rows beyond a few hundred rows: the kernel alone runs only {ceiling:.1f}x more
  proposals per second at 2048 rows than at 64 (row "ceiling"), and a service cannot
  batch better than its kernel; what the engine adds beyond that ceiling is the per-step
  overhead that batching amortises. The gain the goal assumes appears where a step of 64
  rows costs about as much as a step of 2048 (a GPU, or many CPU cores); no GPU was
  available for this run.
- The machine is shared: load average {load} (1, 5, 15 min) when the run ended. Absolute
  rates move with that load between runs; ratios less, but single runs of this benchmark
  have differed by up to about 25% in a ratio (a ratio above 1 is such noise: the service
  adds work to the kernel, never removes it).
  uvicorn runs on h11 here (httptools and uvloop are not installed); `uvicorn[standard]`
  lowers per-request cost.
"""

STAND_INS = {
    "bench-toy": "`bench-toy`, a stand-in for the zoo's toy25 (not in zoo/store at the time): "
    "zoo.toy25:Generator and MLPDiscriminator, 4x100, random weights.",
    "bench-digits": "`bench-digits`, a stand-in for the zoo's digits model (not in zoo/store "
    "at the time): a DCGAN-style 1x8x8 generator shipped as a torch.export program, with a "
    "ConvDiscriminator(1, 8, 64), random weights.",
}


def describe(names: dict[str, str]) -> str:
    parts = [STAND_INS.get(name, f"`{name}` from the zoo (zoo/store).") for name in names.values()]
    return " ".join(parts)


if __name__ == "__main__":
    main()
