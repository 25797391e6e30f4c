"""`imh` command line: `imh serve`, `imh worker`, `imh filter`.

Flags override IMH_* environment variables, which override the defaults in
service/settings.py. Examples:

    imh serve --port 9000 --model-store ./store --no-zoo
    imh worker --redis-url redis://127.0.0.1:6379/0 --port 8001
    imh filter candidates.npy --discriminator digits-d --output kept.safetensors
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pydantic import ValidationError

FLAGS = {  # flag -> Settings field; type comes from the field
    "--host": "host",
    "--port": "port",
    "--redis-url": "redis_url",
    "--model-store": "model_store",
    "--admin-token": "admin_token",
    "--device": "device",
    "--max-batch-size": "max_batch_size",
    "--batch-wait-ms": "batch_wait_ms",
    "--torch-threads": "torch_threads",
    "--max-queued-rows": "max_queued_rows",
    "--log-level": "log_level",
}
WORKER_PORT = 8001  # a worker's probes, unless --port or IMH_PORT says otherwise


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="imh", description=__doc__.split("\n")[0])
    commands = root.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the HTTP API")
    worker = commands.add_parser(
        "worker", help="run models for API front ends (needs IMH_REDIS_URL); probes on :8001"
    )
    for command in (serve, worker):
        for flag, field in FLAGS.items():
            command.add_argument(
                flag, dest=field, default=None, help=f"overrides IMH_{field.upper()}"
            )
        command.add_argument(
            "--zoo",
            dest="zoo",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="load the built-in zoo models (IMH_ZOO, default on)",
        )
    from service.cli.filter import add_parser

    add_parser(commands)
    return root


def settings_from(args: argparse.Namespace):
    """Settings with the given flags over IMH_* variables; raises pydantic.ValidationError."""
    from service.settings import Settings  # imports torch: keep --help fast

    overrides = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    if args.command == "worker" and "port" not in overrides and "IMH_PORT" not in os.environ:
        overrides["port"] = WORKER_PORT
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "filter":
        from service.cli.filter import run

        return run(args)
    # Defence in depth: nothing in this process may fall back to unrestricted unpickling.
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        settings = settings_from(args)
    except ValidationError as error:
        for problem in error.errors():
            where = ".".join(str(part) for part in problem["loc"]) or "settings"
            print(f"imh: invalid setting {where}: {problem['msg']}", file=sys.stderr)
        return 2
    if args.command == "worker" and settings.redis_url is None:
        print("imh: `imh worker` needs IMH_REDIS_URL (or --redis-url)", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    if args.command == "worker":
        from service.api.worker_app import create_worker_app

        app = create_worker_app(settings)
    else:
        from service.api.app import create_app

        app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
