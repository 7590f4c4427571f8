"""Waiting at start for what a service needs (broker, database, a conductor), then giving up
with one line.

A service started before its broker or database (a reboot, ``docker compose up``, a rolling
restart of RabbitMQ) should wait for them rather than die, as Nova's services do. Each step of
``start`` that reaches out goes through ``retry_at_start``: attempts with backoff (0.5 s doubling
to 10 s) for up to ``[service] start_retry_timeout`` seconds, each failure logged at WARNING with
what is waited for and why. When the bound is reached it raises ``StartupFailed``, whose
message is one line (no traceback, no repr, passwords masked) that the console script prints
before exiting with ``EXIT_ENVIRONMENT``.

Exit status of ``conductor`` and ``compute-agent`` (docs/operations.md, *Exit status*):

    0  stopped by SIGTERM/SIGINT
    1  an unexpected error (a bug): traceback in the log
    2  configuration error, or refused to start as configured (schema not at head, wrong
       broker login for the role, a release the fleet does not support): fix, then restart
    3  the environment did not answer within the start retry bound (broker or database
       unreachable, login refused, vhost or database missing, no conductor): restarting later
       may work
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

__all__ = [
    "EXIT_CONFIG",
    "EXIT_ENVIRONMENT",
    "EXIT_UNEXPECTED",
    "StartupFailed",
    "retry_at_start",
]

log = structlog.get_logger(__name__)

EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_ENVIRONMENT = 3

FIRST_DELAY = 0.5
MAX_DELAY = 10.0

_T = TypeVar("_T")


class StartupFailed(Exception):
    """What a service needs did not answer within the start retry bound; ``str()`` is one line
    naming what to check."""


async def retry_at_start(
    what: str,
    attempt: Callable[[], Awaitable[_T]],
    *,
    bound: float,
    retry_on: tuple[type[BaseException], ...],
    describe: Callable[[BaseException], str],
) -> _T:
    """``await attempt()`` until it succeeds, retrying ``retry_on`` errors for ``bound`` seconds.

    ``what`` names what is waited for in the log (``"broker"``, ``"database"``); ``describe``
    turns an error into the one line shown (it must not leak a password).
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    delay = FIRST_DELAY
    attempts = 0
    while True:
        attempts += 1
        try:
            return await attempt()
        except retry_on as exc:
            reason = describe(exc)
            remaining = started + bound - loop.time()
            if remaining <= 0:
                elapsed = loop.time() - started
                raise StartupFailed(
                    f"{reason} (gave up after {attempts} attempt{'s' * (attempts > 1)} in "
                    f"{elapsed:.0f} s; [service] start_retry_timeout = {bound:g})"
                ) from exc
            wait = min(delay, remaining)
            log.warning(
                "waiting_at_start",
                waiting_for=what,
                attempt=attempts,
                error=reason,
                retry_in=round(wait, 1),
            )
            await asyncio.sleep(wait)
            delay = min(delay * 2, MAX_DELAY)
