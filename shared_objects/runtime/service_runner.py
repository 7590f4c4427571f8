"""Running one Fleet service process: signals, readiness, watchdog, metrics, clean stop.

Both console scripts (``conductor``, ``compute-agent``) hand their service object to
``run_service``; the service only has to implement ``start``/``stop`` and count its metrics.

    SIGTERM / SIGINT  -> STOPPING=1, stop consuming, drain in-flight work up to the grace period
    SIGHUP            -> service.reload() (e.g. refresh the compute RPC version cap)
    SIGUSR2           -> log every asyncio task with its stack (``task_report``), like Nova's
                         Guru Meditation report: what is this process waiting for right now?

Start and stop, the same for both services. ``start()`` builds step by step and pushes each
step's undo on an ``AsyncExitStack`` before running it: the broker and the database are waited
for (``shared_objects.runtime.startup_retry``), then the RPC server starts, the heartbeat registers
the service, and the periodic work starts last. A step that fails unwinds the steps before it and
re-raises, so a failed start leaves no connection, task or pool behind. ``stop()``:

    1. stop taking work: the RPC server stops consuming and drains in-flight requests for up
       to ``[service] graceful_shutdown_timeout``;
    2. stop the periodic work (conductor: reconciler, census; agent: live-migration monitors,
       rules resync, builds still running, resource tracker) and the upgrade-level refresh;
    3. stop the heartbeat and mark the service down at once (``last_seen_up`` cleared), so
       nobody waits ``service_down_time`` to learn it is gone;
    4. release the connections, the one everything else used last: the agent its hypervisor
       then the broker; the conductor writes the agents' pending beats, closes the broker, then
       the database (the conductor is the only one with a database).

Step 2 is the reverse of ``start`` on each side, which is why the lists differ: an agent has
builds, a tracker and a hypervisor, a conductor a reconciler and a database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import structlog

from shared_objects import exception, version
from shared_objects.runtime.config import FleetConfig, add_config_arguments
from shared_objects.runtime.metrics import MetricsServer, ServiceMetrics
from shared_objects.runtime.sdnotify import SystemdNotifier
from shared_objects.runtime.startup_retry import EXIT_CONFIG, EXIT_ENVIRONMENT, StartupFailed

log = structlog.get_logger(__name__)


class RunnableService(Protocol):
    metrics: ServiceMetrics

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self, grace: float | None = None) -> None: ...

    async def reload(self) -> None: ...


async def run_service(service: RunnableService, cfg: FleetConfig, name: str) -> None:
    """Start ``service``, serve until SIGTERM/SIGINT, then drain and stop it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def _reload() -> None:
        task = loop.create_task(service.reload())
        task.add_done_callback(_log_reload_result)

    loop.add_signal_handler(signal.SIGHUP, _reload)
    loop.add_signal_handler(signal.SIGUSR2, log_task_report)
    notifier = SystemdNotifier()
    watchdog = asyncio.create_task(notifier.watchdog_task(), name="sd-watchdog")
    try:
        async with MetricsServer.from_config(
            cfg.service, service.metrics, ready=lambda: service.ready
        ):
            if not await _start_unless_stopped(service, stop):
                log.info("service_start_interrupted", service=name)
                return
            notifier.ready(f"{name} serving as {cfg.host}")
            log.info("service_ready", service=name, host=cfg.host)
            await stop.wait()
            notifier.stopping(f"{name} draining")
            log.info("service_stopping", service=name, grace=cfg.service.graceful_shutdown_timeout)
            await service.stop(cfg.service.graceful_shutdown_timeout)
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
            loop.remove_signal_handler(sig)
    log.info("service_stopped", service=name, host=cfg.host)


async def _start_unless_stopped(service: RunnableService, stop: asyncio.Event) -> bool:
    """``service.start()``, cancelled (and so unwound) if SIGTERM comes while it still waits
    for the broker or the database. False when it was cancelled."""
    starting = asyncio.ensure_future(service.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if starting.done():
        starting.result()
        return True
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starting
    return False


# Refusals to start as configured: restarting will not help until someone changes something.
_REFUSED = (
    exception.SchemaNotAtHead,
    exception.ServiceTooOld,
    exception.ServiceTooNew,
    exception.WrongIdentity,
)


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--print-config``, ``--version`` and ``--debug``, for both services."""
    add_config_arguments(parser)
    parser.add_argument("--version", action="version", version=version.describe(parser.prog))
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on a failure to start, show the traceback instead of one line",
    )


def serve(
    name: str,
    make_service: Callable[[], RunnableService],
    cfg: FleetConfig,
    *,
    debug: bool = False,
) -> int:
    """Build the service, run it until SIGTERM/SIGINT; the process's exit status.

    A failure to start that the environment or the configuration explains is one line on
    stderr and status 2 (configuration, refusals) or 3 (nothing answered in time); see
    ``shared_objects.runtime.startup_retry``. Anything else is a bug: its traceback, status 1.
    """
    try:
        service = make_service()
    except ValueError as exc:
        if debug:
            raise
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        run(run_service(service, cfg, name))
    except _REFUSED as exc:
        if debug:
            raise
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StartupFailed as exc:
        if debug:
            raise
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    return 0


def task_report() -> list[dict[str, Any]]:
    """Every live task of the running loop: its name, what it runs and where it waits."""
    report = []
    for task in asyncio.all_tasks():
        frames = task.get_stack(limit=12)
        report.append(
            {
                "task": task.get_name(),
                "coro": getattr(task.get_coro(), "__qualname__", repr(task.get_coro())),
                "stack": [
                    f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_lineno} {f.f_code.co_name}"
                    for f in frames
                ],
            }
        )
    return sorted(report, key=lambda t: str(t["coro"]))


def log_task_report() -> None:
    tasks = task_report()
    log.warning("task_report", count=len(tasks), tasks=tasks)


def _log_reload_result(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("service_reload_failed", error=str(task.exception()))


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when installed (the ``speed`` extra), else the default loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)
