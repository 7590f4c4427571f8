"""Running one Fleet service process: signals, readiness, watchdog, metrics, clean stop.

Both console scripts (``conductor``, ``compute-agent``) hand their service object to
``run_service``; the service only has to implement ``start``/``stop`` and count its metrics.

    SIGTERM / SIGINT  -> STOPPING=1, stop consuming, drain in-flight work up to the grace period
    SIGHUP            -> service.reload() (e.g. refresh the compute RPC version cap)
    SIGUSR2           -> log every asyncio task with its stack (``task_report``), like Nova's
                         Guru Meditation report: what is this process waiting for right now?
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from typing import Any, Protocol

import structlog

from shared_objects.config import FleetConfig
from shared_objects.metrics import MetricsServer, ServiceMetrics
from shared_objects.sdnotify import SystemdNotifier

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
            await service.start()
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
