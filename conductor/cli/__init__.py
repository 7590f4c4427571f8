"""``fleetctl``: the operator's command line, one module per command group.

A command group is a module with ``NAME``, ``HELP`` and ``register(parser)``; ``register`` adds
its subcommands and sets ``func`` (``async def func(args, cfg) -> int``) on each. To add a
group, write ``conductor/cli/<group>.py`` and list it in ``COMMAND_GROUPS``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Sequence

from shared_objects.config import load_config_or_exit

COMMAND_GROUPS: tuple[str, ...] = ("conductor.cli.db",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetctl", description="Operate a Fleet deployment.")
    parser.add_argument("--config", help="TOML configuration file (default: $FLEET_CONFIG)")
    groups = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    for module_name in COMMAND_GROUPS:
        module = importlib.import_module(module_name)
        module.register(groups.add_parser(module.NAME, help=module.HELP))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.error(f"{args.group}: choose a command")
    cfg = load_config_or_exit(args.config, prog="fleetctl")
    return int(asyncio.run(func(args, cfg)))


if __name__ == "__main__":
    sys.exit(main())
