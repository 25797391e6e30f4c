"""`imh` command line: `imh serve [--host ... --port ...]`.

Flags override IMH_* environment variables, which override the defaults in
service/settings.py. Example:

    imh serve --port 9000 --model-store ./store --no-zoo
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
    "--model-store": "model_store",
    "--admin-token": "admin_token",
    "--device": "device",
    "--max-batch-size": "max_batch_size",
    "--batch-wait-ms": "batch_wait_ms",
    "--torch-threads": "torch_threads",
    "--max-queued-rows": "max_queued_rows",
    "--log-level": "log_level",
}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="imh", description=__doc__.split("\n")[0])
    commands = root.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the HTTP API (embedded engine)")
    for flag, field in FLAGS.items():
        serve.add_argument(flag, dest=field, default=None, help=f"overrides IMH_{field.upper()}")
    serve.add_argument(
        "--zoo",
        dest="zoo",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="load the built-in zoo models (IMH_ZOO, default on)",
    )
    return root


def settings_from(args: argparse.Namespace):
    """Settings with the given flags over IMH_* variables; raises pydantic.ValidationError."""
    from service.settings import Settings  # imports torch: keep --help fast

    overrides = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Defence in depth: nothing in this process may fall back to unrestricted unpickling.
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        settings = settings_from(args)
    except ValidationError as error:
        for problem in error.errors():
            where = ".".join(str(part) for part in problem["loc"]) or "settings"
            print(f"imh: invalid setting {where}: {problem['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    from service.app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
