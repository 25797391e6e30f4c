"""What the job commands share: submit a job to a running service, follow it with a
progress bar, report how it ended. Used by `imh filter`, `imh sbn-fit`, `imh prune`."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_URL = os.environ.get("IMH_URL", "http://127.0.0.1:8000")


class JobFailed(Exception):
    """The service refused the job, or it did not succeed: `code` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def add_url_flags(command) -> None:
    command.add_argument(
        "--url", default=DEFAULT_URL, help=f"the service (default: $IMH_URL or {DEFAULT_URL})"
    )
    command.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run_job(
    client: Any, spec: dict[str, Any], files: dict[str, Path], quiet: bool
) -> tuple[dict[str, Any], dict[str, str]]:
    """Submit `spec` with `files` (multipart part name -> path), follow it to its end;
    returns (the finished job, the headers that read it). Raises JobFailed."""
    import httpx

    opened = {name: path.open("rb") for name, path in files.items()}
    try:
        answer = client.post("/v1/jobs", data={"job": json.dumps(spec)}, files=opened)
    except httpx.TransportError as error:
        raise JobFailed(f"cannot reach {client.base_url}: {error}", 2) from None
    finally:
        for file in opened.values():
            file.close()
    if answer.status_code != 201:
        raise JobFailed(f"the service refused the job ({answer.status_code}): {answer.text}", 2)
    job = answer.json()
    headers = {"X-IMH-Job-Token": job["token"]}
    state = follow(client, job, headers, quiet)
    job = client.get(f"/v1/jobs/{job['id']}", headers=headers).json()
    if state != "succeeded":
        raise JobFailed(f"job {job['id']} {state}: {job.get('error') or ''}", 1)
    return job, headers


def follow(client: Any, job: dict, headers: dict, quiet: bool) -> str:
    """Show the job's progress until it ends; returns its final state."""
    from tqdm import tqdm

    bar = tqdm(total=100, unit="%", desc=f"{job['type']} {job['id']}", disable=quiet)
    state = job["state"]
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=headers) as events:
        for name, data in sse(events.iter_lines()):
            if name == "progress":
                bar.update(round(100 * data["progress"]) - bar.n)
                if "phase" in data:
                    bar.set_postfix_str(str(data["phase"]))
            elif name == "state":
                state = data["state"]
    bar.close()
    return state


def sse(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    name, data = None, None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif not line and name is not None:
            yield name, data
            name, data = None, None


def fail(command: str, message: str, code: int) -> int:
    print(f"imh {command}: {message}", file=sys.stderr)
    return code
