"""Long calls and dead peers: heartbeats keep slow peers alive, silence is noticed quickly.

Agents here use ``call_monitor_timeout=2`` (a heartbeat every second) and a plain RPC timeout
of 1 s; the conductor also watches the source with a 2 s call-monitor window.
"""

from __future__ import annotations

import asyncio
from typing import Any

from live_migration_helpers import (
    boot,
    check_invariants,
    instance,
    latest_fault,
    settle_task,
    user,
    wait_idle,
    wait_migration,
)

from compute_agent.virt.migration_model import MigrationModel
from shared_objects.testing.eventually import eventually
from shared_objects.testing.fleet import copy_rounds

FAST = MigrationModel(bandwidth_mb_s=2000, round_interval_s=0.02)
UNTIL_FORCED = MigrationModel(
    bandwidth_mb_s=1000,
    dirty_rate_mb_s=2000,
    round_interval_s=0.01,
    stall_rounds=100_000,
    max_rounds=100_000,
)
# Converges in about 1.5 s: time to kill the destination while the copy runs.
STEADY = MigrationModel(bandwidth_mb_s=400, dirty_rate_mb_s=50, round_interval_s=0.05)


async def test_slow_pre_live_migration_longer_than_plain_timeout_succeeds(
    lm_fleet_factory: Any,
) -> None:
    async with lm_fleet_factory(migration=FAST) as fleet:
        assert fleet.agents["host-a"].live_migration.settings.rpc_timeout == 1.0
        (uuid,) = await boot(fleet, "host-a")
        # 3.5 s: longer than the plain timeout (1 s) and the heartbeat window (2 s).
        fleet.driver("host-b").failures.delay("pre_live_migration", 3.5, count=1)
        fleet.driver("host-b").failures.delay("check_can_live_migrate_destination", 2.5, count=1)
        mig = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-b")
        await settle_task(fleet, mig)
        assert (await wait_migration(fleet, mig))["status"] == "completed"
        assert (await instance(fleet, uuid)).host == "host-b"
        await check_invariants(fleet)


async def test_dead_destination_during_pre_live_migration_is_noticed_in_one_window(
    lm_fleet_factory: Any,
) -> None:
    async with lm_fleet_factory(migration=FAST) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        stuck = fleet.driver("host-b").failures.delay("pre_live_migration", 60, count=1)
        mig = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-b")
        await wait_migration(fleet, mig, statuses={"preparing"})
        # The destination is inside pre_live_migration when it dies.
        await eventually(lambda: stuck.fired == 1, what="pre_live_migration entered")
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        await fleet.crash("host-b")
        got = await wait_migration(fleet, mig, within=10)
        noticed = loop.time() - killed_at
        assert got["status"] == "failed"
        assert noticed < 5.0, noticed  # one 2 s window plus slack, not a 60 s timeout
        inst = await instance(fleet, uuid)
        assert (inst.host, inst.task_state) == ("host-a", None)
        assert "pre_live_migration" in await latest_fault(fleet, uuid)
        await fleet.restart("host-b")
        await check_invariants(fleet)


async def test_dead_source_mid_copy_conductor_marks_error_then_source_recovers(
    lm_fleet_factory: Any,
) -> None:
    async with lm_fleet_factory(migration=UNTIL_FORCED) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        mig = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-b")
        await wait_migration(fleet, mig, statuses={"running"})
        await copy_rounds(fleet.driver("host-a"))
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        await fleet.crash("host-a")
        await settle_task(fleet, mig)  # the conductor's call ends: heartbeats stopped
        noticed = loop.time() - killed_at
        assert noticed < 5.0, noticed
        assert (await wait_migration(fleet, mig))["status"] == "error"
        assert "lost" in await latest_fault(fleet, uuid)
        assert (await instance(fleet, uuid)).task_state == "migrating"  # nobody guessed
        await fleet.restart("host-a")
        inst = await wait_idle(fleet, uuid)
        assert inst.host == "host-a"
        assert (await wait_migration(fleet, mig))["status"] == "error"
        await check_invariants(fleet)


async def test_dead_destination_mid_copy_settles_on_destination_after_its_restart(
    lm_fleet_factory: Any,
) -> None:
    async with lm_fleet_factory(migration=STEADY) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        mig = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-b")
        await wait_migration(fleet, mig, statuses={"running"})
        await fleet.crash("host-b")
        # The copy finishes (the source switches over) but post at destination gets no answer.
        await settle_task(fleet, mig)
        assert (await wait_migration(fleet, mig))["status"] == "error"
        assert (await fleet.driver("host-a").get_info(uuid)).phase.value == "migrated_out"
        assert (await instance(fleet, uuid)).task_state == "migrating"
        await fleet.restart("host-b")
        inst = await wait_idle(fleet, uuid)
        assert inst.host == "host-b"
        assert (await wait_migration(fleet, mig))["status"] == "completed"
        await check_invariants(fleet)


async def test_dead_source_during_prechecks_fails_cleanly_after_restart(
    lm_fleet_factory: Any,
) -> None:
    async with lm_fleet_factory(migration=FAST) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        # The destination's check waits, then asks the (by then dead) source.
        fleet.driver("host-b").failures.delay("check_can_live_migrate_destination", 1.0, count=1)
        mig = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-b")
        await fleet.crash("host-a")
        await settle_task(fleet, mig)
        assert (await wait_migration(fleet, mig))["status"] == "failed"
        assert "prechecks" in await latest_fault(fleet, uuid)
        await fleet.restart("host-a")
        inst = await wait_idle(fleet, uuid)
        assert inst.host == "host-a"
        await check_invariants(fleet)


async def test_migration_completes_when_the_conductor_stops_following_it(
    lm_fleet_factory: Any,
) -> None:
    slow = MigrationModel(bandwidth_mb_s=400, round_interval_s=0.05)
    async with lm_fleet_factory(migration=slow) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        mig = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-b")
        await wait_migration(fleet, mig, statuses={"running"})
        # A conductor dying mid-migration: its task (and its call to the source) is gone.
        task = fleet.endpoint.live_migration._running[mig]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert (await wait_migration(fleet, mig))["status"] == "completed"
        inst = await wait_idle(fleet, uuid)
        assert inst.host == "host-b"
        await check_invariants(fleet)


async def test_graceful_stop_of_the_source_lets_the_migration_finish(
    lm_fleet_factory: Any,
) -> None:
    async with lm_fleet_factory(migration=STEADY) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        mig = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-b")
        await wait_migration(fleet, mig, statuses={"running"})
        agent = fleet.agents.pop("host-a")
        await agent.stop(grace=20)  # SIGTERM: drain in-flight requests, then go
        assert (await wait_migration(fleet, mig))["status"] == "completed"
        assert (await instance(fleet, uuid)).host == "host-b"
        await fleet.restart("host-a")
        await check_invariants(fleet)
