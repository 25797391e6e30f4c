"""`imh filter FILE --discriminator NAME`: filter a candidate file through a running
service and keep what the chain (or DRS) accepts.

Uploads the candidates (.npy or .safetensors) as a filter job, follows its events with a
progress bar, and writes the kept candidates themselves in the input's format:
- `kept.npy` (from an .npy input): the kept rows, with `kept.indices.npy` (their rows in
  the input) and `kept.scores.npy` (their calibrated D) beside it;
- `kept.safetensors`: one file with `candidates`, `indices` and `scores`.
Exit status 0 when the job succeeded, 1 when it failed or was cancelled, 2 for bad
arguments or an unreachable service.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

from service.cli.jobs import JobFailed, add_url_flags, fail, run_job


def add_parser(commands) -> None:
    command = commands.add_parser(
        "filter",
        help="filter a candidate file with a discriminator; writes the kept candidates",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument("candidates", type=Path, help=".npy or .safetensors, (N, ...) samples")
    command.add_argument("--discriminator", "-d", required=True, help="a sample discriminator")
    command.add_argument("--calibration", help="default: the discriminator's own default")
    command.add_argument("--method", choices=("imh", "drs"), default="imh", help="default: imh")
    command.add_argument("--chain-length", type=int, help="imh: candidates per chain "
                         "(default: one chain over the whole set)")  # fmt: skip
    command.add_argument("--gamma", type=float, help="drs: shift (default 0: exact)")
    command.add_argument("--gamma-percentile", type=float, help="drs: shift as a percentile")
    command.add_argument("--seed", type=int, help="default: random")
    command.add_argument(
        "--output", "-o", type=Path,
        help="the kept candidates, .npy or .safetensors (default: <candidates>.kept.<suffix>)",
    )  # fmt: skip
    add_url_flags(command)


def run(args: argparse.Namespace) -> int:
    import httpx

    if not args.candidates.is_file():
        return fail("filter", f"no file {args.candidates}", 2)
    suffix = ".safetensors" if args.candidates.suffix == ".safetensors" else ".npy"
    output = args.output or args.candidates.with_suffix(".kept" + suffix)
    spec = {"type": "filter", "discriminator": args.discriminator, "method": args.method}
    for key in ("calibration", "chain_length", "gamma", "gamma_percentile", "seed"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    with httpx.Client(base_url=args.url, timeout=httpx.Timeout(30.0, read=None)) as client:
        try:
            job, headers = run_job(client, spec, {"candidates": args.candidates}, args.quiet)
        except JobFailed as error:
            return fail("filter", str(error), error.code)
        result = client.get(
            f"/v1/jobs/{job['id']}/result",
            headers={**headers, "Accept": "application/x-safetensors"},
        )
    kept = _write_kept(args.candidates, result.content, output)
    print(f"job {job['id']}: kept {kept} of {job['counts']['items']} candidates -> {output}")
    return 0


def _write_kept(candidates_path: Path, result: bytes, output: Path) -> int:
    """The kept rows of the input, with their indices and scores; returns how many."""
    from safetensors.numpy import load, save_file

    arrays = load(result)
    indices = arrays["indices"]
    candidates = _read(candidates_path)
    kept = np.ascontiguousarray(candidates[indices])
    scores = np.ascontiguousarray(arrays["scores"][indices])
    if output.suffix == ".safetensors":
        save_file({"candidates": kept, "indices": indices, "scores": scores}, str(output))
    else:
        np.save(output, kept, allow_pickle=False)
        np.save(output.with_suffix(".indices.npy"), indices, allow_pickle=False)
        np.save(output.with_suffix(".scores.npy"), scores, allow_pickle=False)
    return len(indices)


def _read(path: Path) -> np.ndarray:
    data = path.read_bytes()
    if data.startswith(b"\x93NUMPY"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    from safetensors.numpy import load

    tensors = load(data)
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    for name in ("candidates", "samples", "x"):
        if name in tensors:
            return tensors[name]
    raise ValueError(f"{path} holds {sorted(tensors)}; name the candidates 'candidates'")
