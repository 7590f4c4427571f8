"""One line an operator can act on, for a database the conductor cannot open at start.

SQLAlchemy wraps the driver's error (``DBAPIError.orig``) under several lines of background; the
driver's own first line says what is wrong (``database "x" does not exist``, ``role "y" does not
exist``, ``password authentication failed``). ``describe_database_failure`` keeps that line and
adds what to check. ``DATABASE_CONNECT_ERRORS`` are the errors a start retries.
"""

from __future__ import annotations

import socket
import sqlite3

import asyncpg
from sqlalchemy import exc as sa_exc

__all__ = ["DATABASE_CONNECT_ERRORS", "describe_database_failure"]

DATABASE_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.DBAPIError,
    asyncpg.PostgresError,
    sqlite3.Error,
    OSError,
    TimeoutError,
)

# Driver messages (first line, lower case) and what an operator checks for each.
_HINTS = (
    ("role ", "check the user name of the database URL, or create the role"),
    ("does not exist", "check the name in the database URL, or create it"),
    ("password authentication failed", "check the user name and password of the database URL"),
    ("no pg_hba.conf entry", "the server refuses this client: check pg_hba.conf"),
    ("unable to open database file", "check the path of the SQLite file and its directory"),
    ("the database system is starting up", "PostgreSQL is starting: wait"),
)


def describe_database_failure(exc: BaseException) -> str:
    """Why the database could not be opened and what to check, in one line."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None:
        inner: BaseException = exc.orig
    else:
        inner = exc
    if isinstance(inner, socket.gaierror):
        return "host name not found: check the host of the database URL"
    if isinstance(inner, ConnectionRefusedError):
        return "connection refused: is PostgreSQL running and listening on that host and port?"
    if isinstance(inner, TimeoutError):
        return "no answer from the database in time: check the host and port, and the firewall"
    if isinstance(inner, OSError) and inner.strerror:
        return f"{inner.strerror}: check the host and port of the database URL"
    text = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
    for needle, hint in _HINTS:
        if needle in text.lower():
            return f"{text}: {hint}"
    return text
