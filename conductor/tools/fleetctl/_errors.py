"""Every ``fleetctl`` failure as (exit status, one line naming what to check).

The one place exceptions become what an operator reads: the configuration (``ConfigError``),
the broker (connection refused, login refused, no such vhost, TLS), the conductor (no answer,
a refusal, a not-found), the database (``fleetctl db``: refused, no such database or role), a
command's own errors (``CommandError``). Nothing here prints a traceback or a ``repr``; ``--debug``
(``conductor.tools.fleetctl.main``) adds the traceback. Imported only when something failed.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from conductor.tools.fleetctl._base import CommandError, Exit


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _where(url: str) -> str:
    from shared_objects.runtime.url_secrets import mask_url

    return mask_url(url)


def _broker(exc: BaseException, cfg: Any) -> tuple[int, str] | None:
    """A failure to connect or log in to RabbitMQ (the transport's first connect)."""
    import aiormq.exceptions

    from shared_objects.runtime.messaging import MessageDeliveryFailure

    if not isinstance(exc, MessageDeliveryFailure) or not str(exc).startswith(
        "cannot connect to"  # the transport's first connect (BrokerConnectFailed)
    ):
        return None
    url = _where(cfg.messaging.transport_url) if cfg is not None else "the broker"
    check = "check [messaging] transport_url / $FLEET_TRANSPORT_URL"
    for cause in _chain(exc):
        if isinstance(cause, aiormq.exceptions.ProbableAuthenticationError):
            return (
                Exit.BROKER,
                f"the broker at {url} refused the login (user or password) — {check}",
            )
        if isinstance(cause, aiormq.exceptions.ProtocolSyntaxError) and "Connection.Close" in str(
            cause
        ):
            # RabbitMQ closes the connection at Connection.Open: no such vhost, or no access.
            return (
                Exit.BROKER,
                f"the broker at {url} closed the connection when opening the vhost: it does not "
                f"exist or this login may not use it — {check} (rabbitmqctl list_vhosts)",
            )
        if isinstance(cause, ConnectionRefusedError):
            return (
                Exit.BROKER,
                f"cannot connect to the broker at {url}: connection refused (is RabbitMQ "
                f"running there?) — {check}",
            )
        if isinstance(cause, (OSError, TimeoutError)) and not isinstance(cause, ConnectionError):
            reason = getattr(cause, "strerror", None) or type(cause).__name__
            return Exit.BROKER, f"cannot connect to the broker at {url}: {reason} — {check}"
    # TLS failures and anything else: the transport's own line (it names the cause).
    return Exit.BROKER, f"{_first_line(str(exc))} — {check}"


def _database(exc: BaseException, args: argparse.Namespace, cfg: Any) -> tuple[int, str] | None:
    """A database that cannot be used (only ``fleetctl db`` touches it)."""
    if getattr(args, "group", None) != "db":
        return None
    names = [type(c).__module__ for c in _chain(exc)]
    if not isinstance(exc, OSError) and not any(
        n.startswith(("sqlalchemy", "asyncpg", "sqlite3", "alembic")) for n in names
    ):
        return None
    url = _where(cfg.database.url) if cfg is not None else "the database"
    check = "check [database] url / $FLEET_DATABASE_URL"
    reason = ""
    for cause in _chain(exc):
        module = type(cause).__module__
        if module.startswith("asyncpg") or module == "sqlite3":
            reason = _first_line(str(cause)) or type(cause).__name__
            break
        if isinstance(cause, ConnectionRefusedError):
            reason = "connection refused (is PostgreSQL running there?)"
            break
        if isinstance(cause, OSError):
            reason = cause.strerror or type(cause).__name__
            break
    if not reason:
        reason = _first_line(str(getattr(exc, "orig", None) or exc)) or type(exc).__name__
    return Exit.DATABASE, f"cannot use the database {url}: {reason} — {check}"


def _no_conductor(args: argparse.Namespace, cfg: Any) -> str:
    from shared_objects.rpc_clients.conductor import TOPIC

    exchange = cfg.messaging.control_exchange if cfg is not None else "?"
    return (
        f"no conductor answered on topic {TOPIC!r} (exchange {exchange!r}) within "
        f"{args.timeout:g}s — is a conductor running? (wait longer: --timeout or $FLEETCTL_TIMEOUT)"
    )


def describe(exc: BaseException, args: argparse.Namespace, cfg: Any) -> tuple[int, str]:
    """The exit status and the one line for ``exc`` (``cfg`` None: it did not load)."""
    import sys

    if isinstance(exc, CommandError):
        return exc.code, _first_line(str(exc))
    config_mod = sys.modules.get("shared_objects.runtime.config")
    if config_mod is not None and isinstance(exc, config_mod.ConfigError):
        return Exit.USAGE, f"configuration error: {_first_line(str(exc))}"
    if "shared_objects.runtime.messaging" in sys.modules:
        from shared_objects import exception
        from shared_objects.runtime.messaging import (
            MessagingError,
            MessagingTimeout,
            RemoteError,
            RequestRefused,
            Unauthenticated,
        )

        found = _broker(exc, cfg)
        if found is not None:
            return found
        if isinstance(exc, MessagingTimeout):
            return Exit.NO_CONDUCTOR, _no_conductor(args, cfg)
        if isinstance(exc, (RequestRefused, Unauthenticated, exception.Forbidden)):
            reason = _first_line(str(exc)).removeprefix("Forbidden: ")
            return (
                Exit.FAILED,
                f"refused: {reason} — this broker login needs the operator role "
                "([security] operator_logins)",
            )
        if isinstance(exc, RemoteError):
            detail = _first_line(exc.value or "")
            return Exit.FAILED, f"the conductor failed: {exc.exc_type}: {detail}"
        if isinstance(exc, (exception.FleetException, MessagingError)):
            return Exit.FAILED, _first_line(str(exc)) or type(exc).__name__
    found = _database(exc, args, cfg)
    if found is not None:
        return found
    return (
        Exit.FAILED,
        f"unexpected error: {type(exc).__name__}: {_first_line(str(exc))} (--debug shows "
        "the traceback)",
    )
