"""``fleetctl``: the operator's command line, one module per subject.

A module either is a command group (``NAME``, ``HELP``, ``register(parser)``: ``fleetctl db
upgrade``) or adds top-level commands (``register_commands(subparsers)``: ``fleetctl boot``).
Each command sets ``func`` (``async def func(args, cfg) -> int``).

Start-up is kept cheap: command modules import the RPC runtime, the objects and the database
inside their commands, so ``fleetctl --help`` and a usage error load none of them. The global
options (``--format``, ``-c``, ``--timeout``, ``--config``, ``--debug``) are accepted before or
after the verb. Every failure is one line on stderr with the exit status of ``Exit``
(``conductor/tools/fleetctl/_errors.py`` turns exceptions into that line); ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from conductor.tools.fleetctl._base import CommandError, Exit, seconds
from conductor.tools.fleetctl._output import FORMATS

# Command groups, loaded only when named on the command line (``broker`` alone costs ~0.2 s).
COMMAND_GROUPS: dict[str, tuple[str, str]] = {
    "db": ("conductor.tools.fleetctl.db", "database schema: upgrade, version"),
    "broker": (
        "conductor.tools.fleetctl.broker",
        "the RabbitMQ side of a deployment: vhost, logins, permissions, policies, limits",
    ),
}
COMMAND_MODULES: tuple[str, ...] = (
    "conductor.tools.fleetctl.instances",
    "conductor.tools.fleetctl.actions",
    "conductor.tools.fleetctl.fleet",
    "conductor.tools.fleetctl.secgroups",
    "conductor.tools.fleetctl.migrations",
)
TIMEOUT_ENV = "FLEETCTL_TIMEOUT"


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(Exit.USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Version(argparse.Action):
    """``--version``: the installed package's version (read only when asked for)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        print(f"fleetctl {package_version()}")
        parser.exit()


def package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("fleet")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Below the top, the defaults are SUPPRESS so that an option given before the verb is not
    # reset by the verb's parser.
    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("global options (before or after the command)")
    group.add_argument(
        "--config",
        metavar="PATH",
        default=default(None),
        help="TOML configuration file (default: $FLEET_CONFIG)",
    )
    group.add_argument(
        "-f", "--format", choices=FORMATS, default=default("table"), help="output format"
    )
    group.add_argument(
        "-c",
        "--column",
        action="append",
        metavar="COLUMN",
        default=default(None),
        help="show only this column (repeatable)",
    )
    group.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        default=default(None),
        help=f"how long to wait for a conductor's answer (default: ${TIMEOUT_ENV}, else "
        "[messaging] rpc_response_timeout)",
    )
    group.add_argument(
        "--debug", action="store_true", default=default(False), help="tracebacks and logs"
    )


def _add_globals_below(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    done: set[int] | None = None,
) -> None:
    """The global options on every command parser below ``parser``; with ``argv``, only on
    those it names (argparse descends only into those): one command's parsers rather than
    about a hundred, a few ms less start-up."""
    done = set() if done is None else done
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) in done or (argv is not None and name not in argv):
                    continue  # an alias of a parser already done, or a command not named
                done.add(id(sub))
                _global_options(sub, top=False)
                _add_globals_below(sub, argv, done)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``argv``, command groups it does not name are left empty."""
    parser = Parser(
        prog="fleetctl",
        description="Operate a Fleet deployment.",
        epilog="Exit status: 0 done; 1 the request failed; 2 bad usage or configuration; "
        "3 broker unreachable or login refused; 4 no conductor answered; 5 database unusable; "
        "130 interrupted (docs/operations.md).",
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    _global_options(parser, top=True)
    commands = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    for group, (module_name, help_text) in COMMAND_GROUPS.items():
        sub = commands.add_parser(group, help=help_text)
        if argv is None or group in argv:
            importlib.import_module(module_name).register(sub)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register_commands(commands)
    _add_globals_below(parser, argv)
    return parser


def _timeout(args: argparse.Namespace, cfg: Any) -> float:
    if args.timeout is not None:
        return float(args.timeout)
    text = os.environ.get(TIMEOUT_ENV)
    if text:
        try:
            return seconds(text)
        except argparse.ArgumentTypeError as exc:
            raise CommandError(f"${TIMEOUT_ENV}: {exc}", Exit.USAGE) from None
    return float(cfg.messaging.rpc_response_timeout)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        # The real command line (not a test calling main): see conductor/tools/fleetctl/_startup.py.
        from conductor.tools.fleetctl._startup import (
            cache_argparse_messages,
            defer_imports,
            pause_gc,
            skip_oslo_messaging,
        )

        pause_gc()
        cache_argparse_messages()
        skip_oslo_messaging()
        defer_imports()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.error(f"{args.group}: choose a command")
    cfg = None
    try:
        import asyncio

        from shared_objects.runtime.config import load_config
        from shared_objects.runtime.log import configure_logging

        cfg = load_config(path=args.config)
        args.timeout = _timeout(args, cfg)
        # stdout is for results; a failure is reported once, as one line, by the handler
        # below: the runtime's own log lines only with --debug.
        configure_logging("console", "debug" if args.debug else "critical", stream=sys.stderr)
        return int(asyncio.run(func(args, cfg)))
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    except Exception as exc:
        from conductor.tools.fleetctl._errors import describe

        code, line = describe(exc, args, cfg)
        if args.debug:
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
        print(f"fleetctl: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
