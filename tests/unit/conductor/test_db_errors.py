"""Database outages become one error of the shared tree at the conductor's RPC boundary."""

from __future__ import annotations

import sqlite3

import asyncpg
import pytest
import structlog
from sqlalchemy import exc as sa_exc

from conductor.db.errors import database_unavailable_boundary, is_database_unavailable
from shared_objects import exception
from shared_objects.runtime.messaging import MessagingTimeout


def _wrapped(orig: BaseException, *, invalidated: bool = False) -> sa_exc.DBAPIError:
    return sa_exc.DBAPIError("SELECT 1", {}, orig, connection_invalidated=invalidated)


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connect call failed"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.TooManyConnectionsError("sorry, too many clients already"),
        sa_exc.TimeoutError("QueuePool limit of size 64 overflow 0 reached"),
        _wrapped(ValueError("x"), invalidated=True),
        sa_exc.OperationalError("SELECT 1", {}, ConnectionResetError(104, "reset")),
        # The asyncpg adapter's error raised by a pool checkout, its cause the driver's.
        _chained(RuntimeError("adapted"), ConnectionRefusedError(111, "refused")),
        sqlite3.OperationalError("database is locked"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_outages_are_recognised(error: BaseException) -> None:
    assert is_database_unavailable(error)


@pytest.mark.parametrize(
    "error",
    [
        MessagingTimeout("agent did not answer"),  # a TimeoutError, hence an OSError
        asyncpg.UniqueViolationError("duplicate key"),
        sqlite3.OperationalError("no such table: instances"),
        _wrapped(asyncpg.UndefinedColumnError("no column")),
        exception.InstanceNotFound(instance_uuid="u"),
        ValueError("a bug"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_other_errors_are_not_outages(error: BaseException) -> None:
    assert not is_database_unavailable(error)


async def test_boundary_raises_database_unavailable_from_the_cause_with_one_warning() -> None:
    cause = asyncpg.AdminShutdownError("terminating connection due to administrator command")
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(exception.DatabaseUnavailable) as info:
            async with database_unavailable_boundary("Instance.save", "fleet-host-h1"):
                raise cause
    assert info.value.__cause__ is cause
    assert "AdminShutdownError: terminating connection" in str(info.value)
    assert info.value.rpc_outcome == "unavailable"
    assert [(e["event"], e["log_level"]) for e in logs] == [("database_unavailable", "warning")]
    assert logs[0]["call"] == "Instance.save" and "exc_info" not in logs[0]


async def test_boundary_lets_everything_else_through_unchanged() -> None:
    for error in (exception.InstanceNotFound(instance_uuid="u"), ValueError("bug")):
        with pytest.raises(type(error)) as info:
            async with database_unavailable_boundary("Instance.save", None):
                raise error
        assert info.value is error


def test_database_unavailable_survives_the_wire_format() -> None:
    # Rebuilt on the agent from oslo's failure format: cls(message, **kwargs).
    sent = exception.DatabaseUnavailable(reason="ConnectionRefusedError: refused")
    rebuilt = exception.DatabaseUnavailable(sent.message, **sent.kwargs)
    assert str(rebuilt) == str(sent)
