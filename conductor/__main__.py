"""``conductor`` console script: run one conductor until SIGTERM/SIGINT.

Exits with status 2 and a one-line reason when the configuration is invalid or the database
schema is not at this release's head (run ``fleetctl db upgrade``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import structlog

from conductor.service import ConductorService
from shared_objects import exception, sdnotify
from shared_objects.config import FleetConfig, load_config_or_exit
from shared_objects.log import configure_logging

log = structlog.get_logger(__name__)


async def serve(cfg: FleetConfig) -> None:
    """Start a conductor, wait for a stop signal, drain and stop."""
    service = ConductorService(cfg)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier = sdnotify.SystemdNotifier()
    notifier.ready(f"serving topic conductor as {cfg.host}")
    watchdog = asyncio.create_task(notifier.watchdog_task())
    try:
        await stop.wait()
    finally:
        notifier.stopping()
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        await service.stop()


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when installed (the ``speed`` extra), else the default loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conductor", description=__doc__)
    parser.add_argument("--config", help="TOML configuration file (default: $FLEET_CONFIG)")
    args = parser.parse_args(argv)
    cfg = load_config_or_exit(args.config, prog="conductor")
    configure_logging(
        cfg.logging.format, cfg.logging.level, static={"service": "conductor", "host": cfg.host}
    )
    try:
        _run(serve(cfg))
    except exception.SchemaNotAtHead as exc:
        print(f"conductor: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
