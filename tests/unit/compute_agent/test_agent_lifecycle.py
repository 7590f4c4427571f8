"""An agent whose start fails at any step leaves nothing behind; stop follows one order."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from compute_agent.service import ComputeAgentService
from compute_agent.virt.fake import FakeDriver
from compute_agent.virt.fake_config import FakeDriverConfig
from conductor.db import migration
from conductor.service import ConductorService
from shared_objects import releases
from shared_objects.base import FleetObject
from shared_objects.objects.service import Service
from shared_objects.runtime.config import FleetConfig
from shared_objects.runtime.messaging import BrokerConnectFailed
from shared_objects.runtime.startup_retry import StartupFailed
from shared_objects.testing.readiness import check_ready_follows_lifecycle

HOST = "host-a"
# Every undo an agent's start pushes, in the order a full unwind runs them.
UNDOS = [
    "live_migration.stop",
    "rules_resync.stop",
    "server.stop",
    "build.stop",
    "tracker.stop",
    "levels.stop",
    "reporter.stop",
    "_mark_down",
    "driver.cleanup_host",
    "transport.close",
]


async def refuse(*_: Any, **__: Any) -> None:
    raise RuntimeError("this step fails")


def sync_refuse() -> None:
    raise RuntimeError("this step fails")


async def broker_down(*_: Any, **__: Any) -> None:
    raise BrokerConnectFailed("cannot connect to the broker at amqp://x:***@h/: refused")


def after(step: str) -> list[str]:
    """The undos that run when the step whose own undo is ``step`` fails."""
    return UNDOS[UNDOS.index(step) :]


# The step that fails, how, what start raises, and the undos that must run (in this order).
STEPS: dict[str, tuple[str, Callable[..., Any], type[BaseException], list[str]]] = {
    "broker": ("transport.connect", broker_down, StartupFailed, ["transport.close"]),
    "hypervisor": ("driver.init_host", refuse, RuntimeError, after("driver.cleanup_host")),
    "heartbeat": ("reporter.start", refuse, RuntimeError, after("reporter.stop")),
    "resource tracker": ("tracker.start", refuse, RuntimeError, after("tracker.stop")),
    "rpc server": ("server.start", refuse, RuntimeError, after("server.stop")),
    "live migration": ("live_migration.start", sync_refuse, RuntimeError, UNDOS),
}


@dataclasses.dataclass
class Fleet:
    conductor: ConductorService
    agent_config: FleetConfig
    tmp: Path

    def agent(self) -> ComputeAgentService:
        driver = FakeDriver(FakeDriverConfig(state_dir=self.tmp / "virt", spawn_delay_s=0.0))
        return ComputeAgentService(self.agent_config, driver=driver)

    async def last_seen_up(self) -> Any:
        async with self.conductor._db_context() as ctxt:
            row = await Service.get_by_host_and_binary(ctxt, HOST, releases.BINARY_COMPUTE)
        return row.last_seen_up


@pytest.fixture
async def fleet(sqlite_database_url: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    await migration.upgrade(sqlite_database_url)
    broker = uuid.uuid4().hex
    cfg = FleetConfig(host="conductor-1")
    cfg.database.url = sqlite_database_url
    cfg.messaging.transport_url = f"memory://fleet-conductor-1@{broker}"
    conductor = ConductorService(cfg)
    await conductor.start()
    agent_cfg = dataclasses.replace(
        cfg,
        host=HOST,
        messaging=dataclasses.replace(
            cfg.messaging, transport_url=f"memory://fleet-host-{HOST}@{broker}"
        ),
    )
    agent_cfg.service = dataclasses.replace(cfg.service, start_retry_timeout=0.0)
    previous = FleetObject.indirection_api
    try:
        yield Fleet(conductor, agent_cfg, tmp_path)
    finally:
        FleetObject.indirection_api = previous
        await conductor.stop(grace=1)


def record_undos(agent: ComputeAgentService, calls: list[str]) -> None:
    for name in UNDOS:
        owner_name, _, method_name = name.rpartition(".")
        owner = getattr(agent, owner_name) if owner_name else agent
        method = getattr(owner, method_name)

        async def wrapper(*args: Any, _m: Any = method, _n: str = name, **kwargs: Any) -> Any:
            calls.append(_n)
            return await _m(*args, **kwargs)

        setattr(owner, method_name, wrapper)


@pytest.mark.parametrize("step", list(STEPS))
async def test_a_failed_start_unwinds_what_it_built(fleet: Fleet, step: str) -> None:
    agent = fleet.agent()
    target, failure, error, undone = STEPS[step]
    owner_name, method_name = target.split(".")
    calls: list[str] = []
    record_undos(agent, calls)
    setattr(getattr(agent, owner_name), method_name, failure)
    indirection = FleetObject.indirection_api
    before = asyncio.all_tasks()

    with pytest.raises(error):
        await agent.start()

    assert calls == undone
    assert asyncio.all_tasks() - before == set()
    assert not agent.ready and not agent.server.running
    assert agent.reporter._task is None
    assert FleetObject.indirection_api is indirection
    if "levels.stop" in undone:
        # It had registered (marked up): unwinding marked it down again.
        assert await fleet.last_seen_up() is None


async def test_no_conductor_within_the_bound_is_one_line(fleet: Fleet) -> None:
    await fleet.conductor.stop(grace=0)
    agent = fleet.agent()
    agent.conductor_wait = 0.0
    calls: list[str] = []
    record_undos(agent, calls)
    with pytest.raises(StartupFailed) as failed:
        await agent.start()
    assert calls == ["transport.close"]
    message = str(failed.value)
    assert "\n" not in message
    assert "no conductor answered on topic 'conductor'" in message
    assert "is a conductor running" in message


async def test_stop_drains_the_server_first_then_unwinds_in_reverse_and_marks_down(
    fleet: Fleet,
) -> None:
    agent = fleet.agent()
    calls: list[str] = []
    record_undos(agent, calls)
    await agent.start()
    assert agent.ready
    assert await fleet.last_seen_up() is not None
    await agent.stop(grace=1)
    assert calls == ["server.stop", *UNDOS]
    # Down at once: a stopped agent never shows up for service_down_time.
    assert await fleet.last_seen_up() is None


async def test_ready_only_while_started_consuming_connected_and_not_draining(
    fleet: Fleet,
) -> None:
    await check_ready_follows_lifecycle(fleet.agent())
