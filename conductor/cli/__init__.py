"""``fleetctl``: the operator's command line, one module per subject.

A module either is a command group (``NAME``, ``HELP``, ``register(parser)``: ``fleetctl db
upgrade``) or adds top-level commands (``register_commands(subparsers)``: ``fleetctl boot``).
Each command sets ``func`` (``async def func(args, cfg) -> int``).

Failures print one line on stderr and exit 1 (2 for configuration errors and bad usage).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Sequence

from conductor.cli._session import CommandError
from shared_objects.config import load_config_or_exit
from shared_objects.exception import FleetException
from shared_objects.log import configure_logging
from shared_objects.messaging import MessagingError, RemoteError

COMMAND_GROUPS: tuple[str, ...] = ("conductor.cli.db", "conductor.cli.broker")
COMMAND_MODULES: tuple[str, ...] = (
    "conductor.cli.instances",
    "conductor.cli.fleet",
    "conductor.cli.secgroups",
    "conductor.cli.migrations",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetctl", description="Operate a Fleet deployment.")
    parser.add_argument("--config", help="TOML configuration file (default: $FLEET_CONFIG)")
    parser.add_argument(
        "--format", choices=("table", "json"), default="table", help="output format"
    )
    commands = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    for module_name in COMMAND_GROUPS:
        module = importlib.import_module(module_name)
        module.register(commands.add_parser(module.NAME, help=module.HELP))
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.error(f"{args.group}: choose a command")
    cfg = load_config_or_exit(args.config, prog="fleetctl")
    # stdout is for results (tables, JSON); diagnostics go to stderr, warnings and up only.
    configure_logging("console", "warning", stream=sys.stderr)
    try:
        return int(asyncio.run(func(args, cfg)))
    except (CommandError, FleetException, MessagingError, RemoteError) as exc:
        print(f"fleetctl: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _one_line(exc: BaseException) -> str:
    # Remote exceptions carry the remote traceback after the message: keep the message only.
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
