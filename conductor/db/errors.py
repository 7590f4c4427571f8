"""Database outages as one error of the shared tree, at the boundary where RPC calls are served.

While PostgreSQL restarts (or is down, or the pool is exhausted) every request fails with some
driver or SQLAlchemy error that an agent cannot import and would only see as a ``RemoteError``
with a traceback. ``database_unavailable_boundary`` turns all of them into
``exception.DatabaseUnavailable`` (``raise ... from exc``), which agents rebuild by class and
retry (``compute_agent/transient.py``), and writes one WARNING line instead of an ERROR with a
traceback per request. Every other error passes through unchanged.

Used by the object indirection endpoint and the compute-task endpoint, around the unit of work
of each call: nothing else in the conductor needs to know about driver errors.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator

import asyncpg
import structlog
from sqlalchemy import exc as sa_exc

from conductor.db import asyncpg_exec
from shared_objects import exception
from shared_objects.runtime.messaging import MessagingError

log = structlog.get_logger(__name__)

# Server-side refusals that mean "not now" rather than "never": starting up or shutting down,
# out of connection slots.
_NOT_NOW = (asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)

# SQLite has no server, but a file it cannot open or lock now may be usable in a moment. Other
# sqlite3.OperationalErrors (no such table, syntax) are bugs, not outages.
_SQLITE_TRANSIENT = ("database is locked", "unable to open database", "disk i/o error")

# How far to follow __cause__ / __context__ / .orig: SQLAlchemy wraps the adapted driver error,
# which wraps asyncpg's, which may wrap an OSError.
_MAX_DEPTH = 6


def _outage(exc: BaseException) -> bool:
    """Whether ``exc`` itself (not its causes) says the database cannot be reached now."""
    if isinstance(exc, MessagingError):
        # A compute-task handler's call to an agent timed out (MessagingTimeout is an OSError):
        # a broker or agent matter, never the database's.
        return False
    if isinstance(exc, sqlite3.OperationalError):
        return any(text in str(exc).lower() for text in _SQLITE_TRANSIENT)
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sa_exc.TimeoutError):
        return True  # QueuePool limit reached: every connection busy past pool_timeout
    return isinstance(exc, (*asyncpg_exec.CONNECTION_LOST, *_NOT_NOW))


def is_database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it wraps, means the database is unreachable right now."""
    seen: set[int] = set()
    todo: list[tuple[BaseException, int]] = [(exc, 0)]
    while todo:
        current, depth = todo.pop()
        if id(current) in seen or depth > _MAX_DEPTH:
            continue
        seen.add(id(current))
        if isinstance(current, exception.FleetException):
            # Already one of ours (a conflict, a refusal, or DatabaseUnavailable itself).
            return isinstance(current, exception.DatabaseUnavailable)
        if _outage(current):
            return True
        if isinstance(current, MessagingError):
            continue
        for inner in (
            getattr(current, "orig", None),
            current.__cause__,
            current.__context__,
        ):
            if isinstance(inner, BaseException):
                todo.append((inner, depth + 1))
    return False


def _reason(exc: BaseException) -> str:
    """A short, single-line reason: the innermost driver error's class and first line."""
    inner: BaseException = exc
    for _ in range(_MAX_DEPTH):
        nxt = getattr(inner, "orig", None) or inner.__cause__
        if not isinstance(nxt, BaseException):
            break
        inner = nxt
    text = str(inner).strip().splitlines()[0] if str(inner).strip() else ""
    return f"{type(inner).__name__}: {text}"[:200] if text else type(inner).__name__


@contextlib.asynccontextmanager
async def database_unavailable_boundary(what: str, caller: str | None) -> AsyncIterator[None]:
    """Run one RPC call's database work; a database outage leaves it as ``DatabaseUnavailable``.

    ``what`` names the call for the log line (``Instance.save``, ``compute_task.build_instances``),
    ``caller`` is the broker-validated login.
    """
    try:
        yield
    except exception.FleetException:
        raise
    except Exception as exc:
        if not is_database_unavailable(exc):
            raise
        reason = _reason(exc)
        log.warning("database_unavailable", call=what, caller=caller, reason=reason)
        raise exception.DatabaseUnavailable(reason=reason) from exc
