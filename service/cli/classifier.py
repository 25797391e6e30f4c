"""`imh sbn-fit CLASSIFIER --data FILE` and `imh prune CLASSIFIER --data FILE`: run an
sbn-fit or sbp-prune job on a loaded classifier (an uploaded torch.export program or a
built-in one) through a running service, with a progress bar, and print the report.

Data files are safetensors or .npz holding `x` (inputs, (N, *input_shape)) and `y`
(integer labels); `--heldout` (x and y) is the report's data (default: a seeded share
of --data); `--ood` (x only) gives sbn-fit's out-of-domain AUROC. The new classifier is
registered as `--output` (default <classifier>-sbn or <classifier>-sbp) and served by
POST /v1/classifiers/<output>/predict. Exit status 0 when the job succeeded, 1 when it
failed or was cancelled, 2 for bad arguments or an unreachable service.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from service.cli.jobs import JobFailed, add_url_flags, fail, run_job

JOB_TYPES = {"sbn-fit": "sbn-fit", "prune": "sbp-prune"}


def add_parsers(commands) -> None:
    for command_name, job_type in JOB_TYPES.items():
        what = "fit SBN statistics" if job_type == "sbn-fit" else "prune with SBP"
        command = commands.add_parser(
            command_name, help=f"{what} for a classifier (a job; prints its report)",
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        command.add_argument("classifier", help="a loaded classifier, name or name:version")
        command.add_argument("--data", required=True, type=Path, help="training x and y")
        command.add_argument("--heldout", type=Path, help="held-out x and y for the report")
        if job_type == "sbn-fit":
            command.add_argument("--ood", type=Path, help="out-of-domain x (AUROC)")
        command.add_argument("--output", help="name of the new classifier")
        command.add_argument("--epochs", type=int, help="default: 3 (sbn-fit), 60 (prune)")
        command.add_argument("--batch-size", type=int, help="default: 32")
        command.add_argument("--seed", type=int, help="default: 0")
        add_url_flags(command)
        command.set_defaults(job_type=job_type)


def run(args: argparse.Namespace) -> int:
    import httpx

    files = {part: getattr(args, part, None) for part in ("data", "heldout", "ood")}
    files = {part: path for part, path in files.items() if path is not None}
    for path in files.values():
        if not path.is_file():
            return fail(args.command, f"no file {path}", 2)
    spec = {"type": args.job_type, "classifier": args.classifier}
    for key in ("output", "epochs", "batch_size", "seed"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    with httpx.Client(base_url=args.url, timeout=httpx.Timeout(30.0, read=None)) as client:
        try:
            job, _ = run_job(client, spec, files, args.quiet)
        except JobFailed as error:
            return fail(args.command, str(error), error.code)
    print(json.dumps(_summary(job["report"]), indent=2))
    print(f"job {job['id']}: new classifier {job['output']} (GET /v1/classifiers/{job['output']})")
    return 0


def _summary(report: dict) -> dict:
    """The report without its training history and settings (the full one is served with
    the new classifier)."""
    if isinstance(report, dict):
        return {k: _summary(v) for k, v in report.items() if k not in ("history", "settings")}
    return report
