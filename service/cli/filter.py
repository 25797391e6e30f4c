"""`imh filter FILE --discriminator NAME`: submit a filter job, show its progress, save
the result.

Talks to a running service over HTTP (--url, default $IMH_URL or http://127.0.0.1:8000):
uploads the candidates (.npy or .safetensors), follows the job's events with a progress
bar, and writes the result (.safetensors with indices, scores, log_ratio and final; or
.npy of the accepted indices) to --output. Exit status 0 when the job succeeded, 1 when
it failed or was cancelled, 2 for bad arguments or an unreachable service.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_parser(commands) -> None:
    command = commands.add_parser("filter", help="filter a candidate file with a discriminator")
    command.add_argument("candidates", type=Path, help=".npy or .safetensors, (N, ...) samples")
    command.add_argument("--discriminator", "-d", required=True)
    command.add_argument("--calibration")
    command.add_argument("--method", choices=("imh", "drs"), default="imh")
    command.add_argument("--chain-length", type=int, help="imh: candidates per chain")
    command.add_argument("--gamma", type=float, help="drs: shift (0: exact)")
    command.add_argument("--gamma-percentile", type=float)
    command.add_argument("--seed", type=int)
    command.add_argument("--output", "-o", type=Path, help="default: <candidates>.kept.npy")
    command.add_argument("--url", default=os.environ.get("IMH_URL", "http://127.0.0.1:8000"))
    command.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import httpx
    from tqdm import tqdm

    if not args.candidates.is_file():
        return _fail(f"no file {args.candidates}", 2)
    output = args.output or args.candidates.with_suffix(".kept.npy")
    spec = {"type": "filter", "discriminator": args.discriminator, "method": args.method}
    for key in ("calibration", "chain_length", "gamma", "gamma_percentile", "seed"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    with httpx.Client(base_url=args.url, timeout=httpx.Timeout(30.0, read=None)) as client:
        try:
            with args.candidates.open("rb") as file:
                answer = client.post(
                    "/v1/jobs", data={"job": json.dumps(spec)}, files={"candidates": file}
                )
        except httpx.TransportError as error:
            return _fail(f"cannot reach {args.url}: {error}", 2)
        if answer.status_code != 201:
            return _fail(f"the service refused the job ({answer.status_code}): {answer.text}", 2)
        job = answer.json()
        bar = tqdm(total=job["counts"]["items"], unit="cand", disable=args.quiet)
        state = job["state"]
        with client.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
            for name, data in _sse(events.iter_lines()):
                if name == "progress":
                    bar.update(data["items_done"] - bar.n)
                elif name == "state":
                    state = data["state"]
        bar.close()
        job = client.get(f"/v1/jobs/{job['id']}").json()
        if state != "succeeded":
            return _fail(f"job {job['id']} {state}: {job.get('error') or ''}", 1)
        headers = {"Accept": "application/x-safetensors"} if output.suffix == ".safetensors" else {}
        with client.stream("GET", f"/v1/jobs/{job['id']}/result", headers=headers) as result:
            with output.open("wb") as file:
                for chunk in result.iter_bytes():
                    file.write(chunk)
    counts = job["counts"]
    print(f"job {job['id']}: kept {counts['accepted']} of {counts['items']} candidates "
          f"-> {output}")  # fmt: skip
    return 0


def _sse(lines):
    name, data = None, None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif not line and name is not None:
            yield name, data
            name, data = None, None


def _fail(message: str, code: int) -> int:
    print(f"imh filter: {message}", file=sys.stderr)
    return code
