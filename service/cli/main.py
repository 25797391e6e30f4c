"""`imh` command line: `imh serve`, `imh worker`, `imh filter`, `imh sbn-fit`, `imh prune`,
`imh settings`.

Every setting (service/settings.py) is a flag of `serve` and `worker`, named after its
environment variable: IMH_MAX_N is `--max-n`, IMH_ZOO is `--zoo` / `--no-zoo`. Flags
override IMH_* variables, which override the defaults. Examples:

    imh serve --port 9000 --model-store ./store --no-zoo
    imh worker --redis-url redis://127.0.0.1:6379/0 --port 8002
    imh filter candidates.npy --discriminator digits-d --output kept.safetensors
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys

from pydantic import ValidationError

from service.settings import Settings

WORKER_PORT = 8001  # a worker's probes, unless --port or IMH_PORT says otherwise


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="imh", description=__doc__.split("\n")[0])
    commands = root.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the HTTP API", description=_SERVE)
    worker = commands.add_parser(
        "worker", help="run models for API front ends (needs IMH_REDIS_URL)", description=_WORKER
    )
    for command in (serve, worker):
        _add_setting_flags(command)
    shown = commands.add_parser(
        "settings", help="every setting: variable, default, value now, meaning"
    )
    _add_setting_flags(shown)
    shown.add_argument(
        "--markdown", action="store_true", help="the README's table: variable, default, meaning"
    )
    from service.cli import classifier as classifier_cli
    from service.cli import filter as filter_cli

    filter_cli.add_parser(commands)
    classifier_cli.add_parsers(commands)
    return root


_SERVE = "Serve the HTTP API. Each flag overrides its IMH_ variable."
_WORKER = (
    "Run the models for API front ends over Redis (IMH_REDIS_URL). Probes and /metrics on "
    f"--port (default {WORKER_PORT}): give each worker on a machine its own port, e.g. one "
    "worker per GPU with --device cuda:0 --port 8001, --device cuda:1 --port 8002."
)


def _add_setting_flags(command: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        if name == "admin_token":
            default = "unset"
        shown = f"{field.description or ''} [IMH_{name.upper()}; default: {default}]"
        if field.annotation is bool:
            command.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=shown
            )
        else:
            command.add_argument(flag, dest=name, default=None, metavar="VALUE", help=shown)


def setting_rows(settings: Settings | None = None) -> list[tuple[str, str, str, str]]:
    """(variable, default, value in `settings`, meaning) of every setting."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = "unset" if name == "admin_token" else field.get_default(call_default_factory=True)
        if name == "device":
            default = "cuda if available, else cpu"
        value = getattr(settings, name, default) if settings is not None else default
        if name == "admin_token" and value not in (None, "unset"):
            value = "(set)"
        rows.append((f"IMH_{name.upper()}", _shown(default), _shown(value), field.description))
    return rows


def _shown(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "1" if value else "0"
    return "" if value == "" else str(value)


def markdown_settings() -> str:
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | {default or '(empty)'} | {meaning} |"
              for name, default, _, meaning in setting_rows()]  # fmt: skip
    return "\n".join(lines)


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings with the given flags over IMH_* variables; raises pydantic.ValidationError."""
    overrides = {
        name: value for name, value in vars(args).items()
        if name in Settings.model_fields and value is not None
    }  # fmt: skip
    if args.command == "worker" and "port" not in overrides and "IMH_PORT" not in os.environ:
        overrides["port"] = WORKER_PORT
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "filter":
        from service.cli.filter import run

        return run(args)
    if args.command in ("sbn-fit", "prune"):
        from service.cli.classifier import run

        return run(args)
    if args.command == "settings":
        return _print_settings(args)
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
    if problem := _port_taken(settings.host, settings.port, args.command):
        print(f"imh: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    if args.command == "worker":
        from service.api.worker_app import create_worker_app

        app = create_worker_app(settings)
        grace = settings.worker_drain_s + 5
    else:
        from service.api.app import create_app

        app = create_app(settings)
        grace = 5
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=grace,
    )
    return 0


def _print_settings(args: argparse.Namespace) -> int:
    if args.markdown:
        print(markdown_settings())
        return 0
    try:
        settings = settings_from(args)
    except ValidationError as error:
        print(f"imh: invalid settings: {error}", file=sys.stderr)
        return 2
    for name, default, value, meaning in setting_rows(settings):
        changed = "" if value == default else f"  (default {default or '(empty)'})"
        print(f"{name}={value}{changed}\n    {meaning}")
    return 0


def _port_taken(host: str, port: int, command: str) -> str | None:
    """Why the port cannot be bound (another process has it), else None."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                return None  # let uvicorn report anything else
            hint = (
                "another imh worker on this machine? give each worker its own --port "
                f"(e.g. --port {port + 1}), or --port 0 for any free port"
                if command == "worker"
                else "pick another with --port"
            )
            return f"port {port} on {host} is already in use ({hint})"
    return None


if __name__ == "__main__":
    sys.exit(main())
