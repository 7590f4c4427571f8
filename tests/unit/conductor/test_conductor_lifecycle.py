"""A conductor whose start fails at any step leaves nothing behind; stop follows one order."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from conductor.db import migration
from conductor.service import ConductorService
from shared_objects.objects.service import Service
from shared_objects.runtime.config import FleetConfig
from shared_objects.runtime.messaging import BrokerConnectFailed
from shared_objects.runtime.startup_retry import StartupFailed
from shared_objects.testing.readiness import check_ready_follows_lifecycle


def conductor_config(url: str) -> FleetConfig:
    cfg = FleetConfig(host="conductor-1")
    cfg.database.url = url
    cfg.messaging.transport_url = f"memory://fleet-conductor-1@{uuid.uuid4().hex}"
    cfg.service.start_retry_timeout = 0.0
    return cfg


def record(calls: list[str], name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return await method(*args, **kwargs)

    return wrapper


async def refuse(*_: Any, **__: Any) -> None:
    raise RuntimeError("this step fails")


async def broker_down(*_: Any, **__: Any) -> None:
    raise BrokerConnectFailed("cannot connect to the broker at amqp://x:***@h/: refused")


def sync_refuse() -> None:
    raise RuntimeError("this step fails")


# Each step, what its failure raises, and which undos must have run (in this order).
STEPS = {
    "broker after the database opened": (
        "transport.connect",
        broker_down,
        StartupFailed,
        ["transport.close", "database.dispose"],
    ),
    "rpc server": (
        "server.start",
        refuse,
        RuntimeError,
        ["server.stop", "liveness.stop", "transport.close", "database.dispose"],
    ),
    "heartbeat": (
        "reporter.start",
        refuse,
        RuntimeError,
        ["reporter.stop", "server.stop", "liveness.stop", "transport.close", "database.dispose"],
    ),
    "upgrade levels": (
        "levels.start",
        refuse,
        RuntimeError,
        [
            "levels.stop",
            "reporter.stop",
            "server.stop",
            "liveness.stop",
            "transport.close",
            "database.dispose",
        ],
    ),
}
UNDOS = [
    "reconciler.stop",
    "levels.stop",
    "reporter.stop",
    "server.stop",
    "liveness.stop",
    "transport.close",
    "database.dispose",
]


@pytest.mark.parametrize("step", list(STEPS))
async def test_a_failed_start_unwinds_what_it_built(sqlite_database_url: str, step: str) -> None:
    await migration.upgrade(sqlite_database_url)
    service = ConductorService(conductor_config(sqlite_database_url), topic=uuid.uuid4().hex)
    attribute, failure, error, undone = STEPS[step]
    owner_name, method_name = attribute.split(".")
    calls: list[str] = []
    for name in UNDOS:
        part, method = name.split(".")
        obj = getattr(service, part)
        setattr(obj, method, record(calls, name, getattr(obj, method)))
    setattr(getattr(service, owner_name), method_name, failure)
    before = asyncio.all_tasks()

    with pytest.raises(error):
        await service.start()

    assert calls == undone
    assert asyncio.all_tasks() - before == set()
    assert not service.server.running and not service.ready
    assert service.reporter._task is None
    # A later stop has nothing left to unwind (stopping the stopped server is a no-op).
    calls.clear()
    await service.stop(grace=0)
    assert calls == ["server.stop"]


async def test_a_failed_start_after_registering_leaves_the_service_down(
    sqlite_database_url: str,
) -> None:
    await migration.upgrade(sqlite_database_url)
    service = ConductorService(conductor_config(sqlite_database_url), topic=uuid.uuid4().hex)
    service.reconciler.start = sync_refuse  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await service.start()
    assert service._census is None
    assert await last_seen_up(service) is None


async def test_stop_drains_the_server_first_then_unwinds_in_reverse_and_marks_down(
    sqlite_database_url: str,
) -> None:
    await migration.upgrade(sqlite_database_url)
    service = ConductorService(conductor_config(sqlite_database_url), topic=uuid.uuid4().hex)
    calls: list[str] = []
    for name in UNDOS:
        part, method = name.split(".")
        obj = getattr(service, part)
        setattr(obj, method, record(calls, name, getattr(obj, method)))
    await service.start()
    assert service.reporter.service is not None
    assert service.reporter.service.last_seen_up is not None
    before_census = service._census
    await service.stop(grace=1)
    assert calls == ["server.stop", *UNDOS]
    assert before_census is not None and before_census.done()
    # Down at once, not service_down_time after the last beat.
    assert await last_seen_up(service) is None


async def last_seen_up(service: ConductorService) -> Any:
    """The row as stored (a disposed engine opens a new pool for this read, closed after)."""
    try:
        async with service._db_context() as ctxt:
            row = await Service.get_by_host_and_binary(ctxt, "conductor-1", "fleet-conductor")
    finally:
        await service.database.dispose()
    return row.last_seen_up


async def test_ready_only_while_started_consuming_connected_and_not_draining(
    sqlite_database_url: str,
) -> None:
    await migration.upgrade(sqlite_database_url)
    service = ConductorService(conductor_config(sqlite_database_url), topic=uuid.uuid4().hex)
    await check_ready_follows_lifecycle(service)
