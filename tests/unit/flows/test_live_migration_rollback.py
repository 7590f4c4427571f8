"""Every failure point of a live migration rolls back to exactly one host, with a record of why.

After each: the instance is ACTIVE on the source with task_state None, the Migration is
failed/error/cancelled, no guest or claim is left on the destination, and a fault or an action
event says what happened. The fleet invariants hold.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from live_migration_helpers import (
    boot,
    check_invariants,
    events,
    instance,
    latest_fault,
    settle_task,
    user,
    wait_migration,
)

from compute_agent.virt.migration_model import MigrationModel, NonConvergencePolicy
from shared_objects import exception
from shared_objects.testing.fleet import copy_rounds

FAST = MigrationModel(bandwidth_mb_s=2000, round_interval_s=0.02)
NEVER_CONVERGES = MigrationModel(
    bandwidth_mb_s=1000, dirty_rate_mb_s=2000, round_interval_s=0.01, stall_rounds=10
)
UNTIL_FORCED = MigrationModel(
    bandwidth_mb_s=1000,
    dirty_rate_mb_s=2000,
    round_interval_s=0.01,
    stall_rounds=100_000,
    max_rounds=100_000,
)


async def _assert_stayed_on_source(fleet: Any, uuid: str, source: str = "host-a") -> None:
    inst = await instance(fleet, uuid)
    assert (inst.vm_state, inst.task_state, inst.host) == ("active", None, source)
    assert (await fleet.driver(source).get_info(uuid)).phase.value == "running"
    for host in fleet.agents:
        if host != source:
            assert uuid not in await fleet.driver(host).list_instance_uuids()
            assert not fleet.agents[host].tracker.holds(uuid)
    assert fleet.agents[source].tracker.holds(uuid)
    await check_invariants(fleet)


async def _migrate(fleet: Any, uuid: str, host: str | None = "host-b") -> dict[str, Any]:
    mig = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host=host)
    await settle_task(fleet, mig)
    return await wait_migration(fleet, mig)


@pytest.mark.parametrize(
    ("host", "step", "fault_text"),
    [
        ("host-b", "check_can_live_migrate_destination", "prechecks"),
        ("host-a", "check_can_live_migrate_source", "prechecks"),
        ("host-b", "pre_live_migration", "pre_live_migration"),
        ("host-b", "post_live_migration_at_destination", "post_live_migration_at_destination"),
    ],
)
async def test_failure_at_each_step_keeps_instance_on_source(
    lm_fleet_factory: Any, host: str, step: str, fault_text: str
) -> None:
    async with lm_fleet_factory(migration=FAST) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        fleet.driver(host).failures.inject(step, count=None)
        got = await _migrate(fleet, uuid)
        assert got["status"] in {"failed", "error"}
        assert fault_text in await latest_fault(fleet, uuid)
        await _assert_stayed_on_source(fleet, uuid)


async def test_copy_failing_midway_rolls_back(lm_fleet_factory: Any) -> None:
    async with lm_fleet_factory(migration=FAST) as fleet:
        (uuid,) = await boot(fleet, "host-a", ram=2048)
        fleet.driver("host-a").failures.inject("live_migration_copy", after_rounds=3)
        got = await _migrate(fleet, uuid)
        assert got["status"] == "failed"
        assert got["memory_processed"] and got["memory_processed"] > 0  # it did copy some
        assert "InjectedFailure" in await latest_fault(fleet, uuid)
        assert ("compute_live_migration", "host-a", "Error") in await events(fleet, uuid)
        await _assert_stayed_on_source(fleet, uuid)


async def test_destination_check_refusal_retries_on_another_host(lm_fleet_factory: Any) -> None:
    async with lm_fleet_factory(("host-a", "host-b", "host-c"), migration=FAST) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        fleet.driver("host-b").failures.inject("check_can_live_migrate_destination", count=None)
        got = await _migrate(fleet, uuid, host=None)
        assert got["status"] == "completed"
        assert got["dest_compute"] == "host-c"
        assert ("compute_check_can_live_migrate_destination", "host-b", "Error") in await events(
            fleet, uuid
        )
        await check_invariants(fleet)


async def test_no_destination_passing_prechecks_fails_after_max_attempts(
    lm_fleet_factory: Any,
) -> None:
    async with lm_fleet_factory(("host-a", "host-b", "host-c"), migration=FAST) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        for host in ("host-b", "host-c"):
            fleet.driver(host).failures.inject("check_can_live_migrate_destination", count=None)
        got = await _migrate(fleet, uuid, host=None)
        assert got["status"] == "failed"
        fault = await latest_fault(fleet, uuid)
        assert "host-b" in fault and "host-c" in fault
        await _assert_stayed_on_source(fleet, uuid)


async def test_non_convergence_aborts_by_default(lm_fleet_factory: Any) -> None:
    async with lm_fleet_factory(migration=NEVER_CONVERGES) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        got = await _migrate(fleet, uuid)
        assert got["status"] == "failed"
        assert "MigrationNotConverging" in await latest_fault(fleet, uuid)
        await _assert_stayed_on_source(fleet, uuid)


async def test_non_convergence_with_force_policy_completes(lm_fleet_factory: Any) -> None:
    forced = MigrationModel(
        bandwidth_mb_s=1000,
        dirty_rate_mb_s=2000,
        round_interval_s=0.01,
        stall_rounds=10,
        policy=NonConvergencePolicy.FORCE,
    )
    async with lm_fleet_factory(migration=forced) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        got = await _migrate(fleet, uuid)
        assert got["status"] == "completed"
        assert (await instance(fleet, uuid)).host == "host-b"
        await check_invariants(fleet)


async def _running(fleet: Any, uuid: str) -> str:
    mig = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-b")
    await wait_migration(fleet, mig, statuses={"running"})
    await copy_rounds(fleet.driver("host-a"))
    return mig


async def test_force_complete_makes_a_stalled_copy_finish(lm_fleet_factory: Any) -> None:
    async with lm_fleet_factory(migration=UNTIL_FORCED) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        mig = await _running(fleet, uuid)
        await fleet.tasks.live_migration_force_complete(user(), migration_uuid=mig)
        await settle_task(fleet, mig)
        assert (await wait_migration(fleet, mig))["status"] == "completed"
        assert (await instance(fleet, uuid)).host == "host-b"
        await check_invariants(fleet)


async def test_abort_while_running_cancels_and_keeps_source(lm_fleet_factory: Any) -> None:
    async with lm_fleet_factory(migration=UNTIL_FORCED) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        mig = await _running(fleet, uuid)
        await fleet.tasks.live_migration_abort(user(), migration_uuid=mig)
        await settle_task(fleet, mig)
        assert (await wait_migration(fleet, mig))["status"] == "cancelled"
        await _assert_stayed_on_source(fleet, uuid)
        with pytest.raises(exception.InvalidRequest, match="already cancelled"):
            await fleet.tasks.live_migration_abort(user(), migration_uuid=mig)


async def test_abort_while_preparing_cancels(lm_fleet_factory: Any) -> None:
    async with lm_fleet_factory(migration=FAST) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        fleet.driver("host-b").failures.delay("pre_live_migration", 0.5, count=1)
        mig = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-b")
        await wait_migration(fleet, mig, statuses={"preparing"})
        await fleet.tasks.live_migration_abort(user(), migration_uuid=mig)
        await settle_task(fleet, mig)
        assert (await wait_migration(fleet, mig))["status"] == "cancelled"
        await _assert_stayed_on_source(fleet, uuid)


async def test_force_complete_needs_a_running_migration(lm_fleet_factory: Any) -> None:
    async with lm_fleet_factory(migration=FAST) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        got = await _migrate(fleet, uuid)
        with pytest.raises(exception.InvalidRequest, match="already completed"):
            await fleet.tasks.live_migration_force_complete(user(), migration_uuid=got["uuid"])


async def test_source_with_too_many_outgoing_migrations_refuses_more(
    lm_fleet_factory: Any,
) -> None:
    async with lm_fleet_factory(migration=UNTIL_FORCED) as fleet:
        first, second = await boot(fleet, "host-a", count=2)
        fleet.agents["host-a"].live_migration.settings.max_in_flight = 1
        mig = await _running(fleet, first)
        got = await _migrate(fleet, second)
        assert got["status"] == "failed"
        assert "outgoing live migrations" in await latest_fault(fleet, second)
        await fleet.tasks.live_migration_force_complete(user(), migration_uuid=mig)
        await settle_task(fleet, mig)
        assert (await wait_migration(fleet, mig))["status"] == "completed"
        await check_invariants(fleet)


async def test_conductor_task_failing_before_hand_over_releases_instance(
    lm_fleet_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with lm_fleet_factory(migration=FAST) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        task = fleet.endpoint.live_migration

        async def broken(*_args: Any, **_kwargs: Any) -> None:
            raise RuntimeError("scheduler exploded")

        monkeypatch.setattr(task, "_precheck", broken)
        got = await _migrate(fleet, uuid)
        assert got["status"] == "error"
        assert "scheduler exploded" in await latest_fault(fleet, uuid)
        await _assert_stayed_on_source(fleet, uuid)


async def test_abort_while_queued_behind_another_copy_cancels(lm_fleet_factory: Any) -> None:
    async with lm_fleet_factory(migration=UNTIL_FORCED) as fleet:
        first, second = await boot(fleet, "host-a", count=2)
        fleet.agents["host-a"].live_migration.settings.max_concurrent = 1
        running = await _running(fleet, first)
        queued = await fleet.tasks.live_migrate_instance(
            user(), instance_uuid=second, host="host-b"
        )
        await wait_migration(fleet, queued, statuses={"queued"})
        # An absence check, so a fixed wait: a second copy allowed by the source would have
        # left "queued" within this time.
        await asyncio.sleep(0.2)
        assert (await wait_migration(fleet, queued, statuses={"queued"}))["status"] == "queued"
        await fleet.tasks.live_migration_abort(user(), migration_uuid=queued)
        await fleet.tasks.live_migration_force_complete(user(), migration_uuid=running)
        await settle_task(fleet, queued)
        await settle_task(fleet, running)
        assert (await wait_migration(fleet, queued))["status"] == "cancelled"
        assert (await wait_migration(fleet, running))["status"] == "completed"
        assert [(await instance(fleet, u)).host for u in (first, second)] == ["host-b", "host-a"]
        await check_invariants(fleet)


async def test_abort_during_prechecks_works_from_any_conductor_replica(
    lm_fleet_factory: Any,
) -> None:
    from conductor.tasks.live_migration import LiveMigrationTask

    async with lm_fleet_factory(migration=FAST) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        fleet.driver("host-b").failures.delay("check_can_live_migrate_destination", 1.0, count=1)
        mig = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-b")
        assert (await wait_migration(fleet, mig, statuses={"accepted"}))["status"] == "accepted"
        # Another replica: same database, none of this one's in-memory state.
        other = LiveMigrationTask(fleet.database, fleet.endpoint.live_migration.compute)
        await other.live_migration_abort(user(), migration_uuid=mig)
        assert (await wait_migration(fleet, mig))["status"] == "cancelled"
        assert (await instance(fleet, uuid)).task_state is None
        await settle_task(fleet, mig)  # the prechecking task noticed and stopped
        assert not fleet.agents["host-b"].tracker.holds(uuid)
        assert "compute_pre_live_migration" not in {e for e, _h, _r in await events(fleet, uuid)}
        await _assert_stayed_on_source(fleet, uuid)


async def test_source_queue_missing_fails_the_migration_and_keeps_the_instance(
    lm_fleet_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hand-over call finds no queue for the source (gone with a broker restart): nothing
    reached the source, so the conductor ends the migration and releases the instance at once
    instead of waiting for agents that never heard of it."""
    from shared_objects.rpc_clients.compute import ComputeAPI
    from shared_objects.runtime.messaging import MessageUndeliverable

    async def undeliverable(self: Any, ctxt: Any, host: str, **kwargs: Any) -> Any:
        raise MessageUndeliverable(f"no queue is bound for 'compute.{host}'")

    async with lm_fleet_factory(migration=FAST) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        monkeypatch.setattr(ComputeAPI, "live_migration", undeliverable)
        got = await _migrate(fleet, uuid)
        assert got["status"] == "error"
        assert "no queue is bound" in await latest_fault(fleet, uuid)
        await _assert_stayed_on_source(fleet, uuid)
