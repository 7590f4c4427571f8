"""Live migration between two FakeDrivers: the sequence, convergence, abort, force, progress."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest
from virt_testlib import FAST, MakeDriver, spec

from compute_agent.virt import (
    FakeDriver,
    GuestPhase,
    GuestSpec,
    InjectedFailure,
    InstanceExists,
    InsufficientResources,
    InvalidGuestState,
    MigrationAborted,
    MigrationModel,
    MigrationNotConverging,
    MigrationPreCheckError,
    MigrationProgress,
    NoActiveMigration,
    PowerState,
    normalize_rules,
)
from shared_objects.testing.fleet import copy_rounds

RULES = [{"protocol": "tcp", "from_port": 22, "to_port": 22, "cidr": "10.0.0.0/8"}]


async def two_hosts(
    make_driver: MakeDriver, **options: Any
) -> tuple[FakeDriver, FakeDriver, GuestSpec]:
    source = await make_driver("src", **options)
    dest = await make_driver("dst", **options)
    guest = spec("vm1", vcpus=2, memory_mb=1024, root_gb=10)
    await source.spawn(guest, "img", [{"volume_id": "vol1", "mountpoint": "/dev/vdb"}], RULES)
    return source, dest, guest


async def prepare(source: FakeDriver, dest: FakeDriver, guest: GuestSpec) -> dict[str, Any]:
    dest_data = await dest.check_can_live_migrate_destination(guest, "src")
    migrate_data = await source.check_can_live_migrate_source(guest, dest_data)
    await dest.pre_live_migration(guest, migrate_data)
    return migrate_data


async def test_full_migration_moves_guest_volumes_and_rules(make_driver: MakeDriver) -> None:
    source, dest, guest = await two_hosts(make_driver)
    migrate_data = await prepare(source, dest, guest)
    assert migrate_data["volumes"] == {"vol1": "/dev/vdb"}
    incoming = await dest.get_info("vm1")
    assert (incoming.phase, incoming.power_state) == (GuestPhase.INCOMING, PowerState.PAUSED)
    assert not incoming.owns_guest
    assert (await dest.get_available_resource()).memory_mb_used == 1024  # reserved

    result = await source.live_migration(guest, "dst", migrate_data)
    assert result.memory_total == 1024 * 1024 * 1024
    assert result.memory_processed >= result.memory_total
    assert not result.forced
    switched = await source.get_info("vm1")
    assert (switched.phase, switched.power_state) == (GuestPhase.MIGRATED_OUT, PowerState.PAUSED)

    await dest.post_live_migration_at_destination(guest)
    await source.post_live_migration(guest)

    assert await source.list_instance_uuids() == []
    final = await dest.get_info("vm1")
    assert (final.phase, final.power_state) == (GuestPhase.RUNNING, PowerState.RUNNING)
    assert await dest.get_volumes("vm1") == {"vol1": "/dev/vdb"}
    assert await dest.get_firewall_rules("vm1") == normalize_rules(RULES)
    assert (await source.get_available_resource()).memory_mb_used == 0


async def test_copy_converges_in_the_rounds_the_model_predicts(make_driver: MakeDriver) -> None:
    # 1024 MB at 1000 MB/s in 0.05 s rounds (50 MB) while 100 MB/s re-dirties 5 MB per round:
    # 45 MB net per round, done when <= 50 MB remain -> 22 rounds.
    source, dest, guest = await two_hosts(make_driver)
    migrate_data = await prepare(source, dest, guest)
    result = await source.live_migration(guest, "dst", migrate_data)
    assert result.rounds == 22
    assert result.downtime_s <= FAST.max_downtime_s


async def test_migration_that_does_not_converge_is_aborted_by_default(
    make_driver: MakeDriver,
) -> None:
    source, dest, guest = await two_hosts(make_driver)
    await source.set_dirty_rate("vm1", 2000.0)  # dirties faster than the 1000 MB/s link
    migrate_data = await prepare(source, dest, guest)
    with pytest.raises(MigrationNotConverging) as err:
        await source.live_migration(guest, "dst", migrate_data)
    assert err.value.kwargs["rounds"] <= FAST.stall_rounds + 1
    info = await source.get_info("vm1")
    assert (info.phase, info.power_state) == (GuestPhase.RUNNING, PowerState.RUNNING)
    # the destination still holds the incoming guest until the agent rolls it back
    await dest.rollback_live_migration_at_destination(guest)
    assert await dest.list_instance_uuids() == []


async def test_force_policy_pauses_a_non_converging_guest_and_completes(
    make_driver: MakeDriver,
) -> None:
    model = MigrationModel(time_scale=0, policy="force", stall_rounds=5)  # type: ignore[arg-type]
    source, dest, guest = await two_hosts(make_driver, migration=model)
    await source.set_dirty_rate("vm1", 2000.0)
    migrate_data = await prepare(source, dest, guest)
    result = await source.live_migration(guest, "dst", migrate_data)
    assert result.forced
    assert (await source.get_info("vm1")).phase is GuestPhase.MIGRATED_OUT


async def test_force_complete_makes_a_stuck_migration_converge(make_driver: MakeDriver) -> None:
    model = MigrationModel(
        bandwidth_mb_s=5000, round_interval_s=0.01, time_scale=1.0, stall_rounds=10_000
    )
    source, dest, guest = await two_hosts(make_driver, migration=model)
    await source.set_dirty_rate("vm1", 50_000.0)
    migrate_data = await prepare(source, dest, guest)
    task = asyncio.create_task(source.live_migration(guest, "dst", migrate_data))
    await copy_rounds(source, 10)
    assert not task.done()  # not converging on its own
    await source.live_migration_force_complete("vm1")
    result = await asyncio.wait_for(task, 5)
    assert result.forced
    assert (await source.get_info("vm1")).phase is GuestPhase.MIGRATED_OUT


async def test_abort_raises_migration_aborted_and_keeps_the_guest_on_the_source(
    make_driver: MakeDriver,
) -> None:
    model = MigrationModel(round_interval_s=0.01, time_scale=1.0, stall_rounds=10_000)
    source, dest, guest = await two_hosts(make_driver, migration=model)
    await source.set_dirty_rate("vm1", 5000.0)
    migrate_data = await prepare(source, dest, guest)
    task = asyncio.create_task(source.live_migration(guest, "dst", migrate_data))
    await copy_rounds(source)
    assert (await source.get_info("vm1")).phase is GuestPhase.MIGRATING_OUT
    await source.live_migration_abort("vm1")
    # abort returns once the copy stopped: the guest is already running here again
    assert (await source.get_info("vm1")).phase is GuestPhase.RUNNING
    with pytest.raises(MigrationAborted):
        await task
    with pytest.raises(NoActiveMigration):
        await source.live_migration_abort("vm1")
    with pytest.raises(NoActiveMigration):
        await source.live_migration_force_complete("vm1")


async def test_progress_is_monotonic_rate_bounded_and_ends_at_100(make_driver: MakeDriver) -> None:
    model = MigrationModel(
        bandwidth_mb_s=2000, round_interval_s=0.01, time_scale=1.0, progress_interval_s=0.05
    )
    source, dest, guest = await two_hosts(make_driver, migration=model)
    migrate_data = await prepare(source, dest, guest)
    reports: list[tuple[float, MigrationProgress]] = []

    async def on_progress(progress: MigrationProgress) -> None:
        reports.append((time.monotonic(), progress))

    result = await source.live_migration(guest, "dst", migrate_data, on_progress)
    assert result.rounds > 10
    assert 2 <= len(reports) < result.rounds  # bounded: far fewer reports than rounds
    percents = [p.percent for _, p in reports]
    processed = [p.memory_processed for _, p in reports]
    assert percents == sorted(percents) and percents[-1] == 100
    assert processed == sorted(processed)
    assert {p.memory_total for _, p in reports} == {1024 * 1024 * 1024}
    assert reports[-1][1].memory_remaining == 0
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(reports[:-1])]
    assert all(gap >= 0.04 for gap in gaps)  # the final report may follow sooner


async def test_slow_progress_callback_does_not_slow_the_copy(make_driver: MakeDriver) -> None:
    source, dest, guest = await two_hosts(make_driver)
    migrate_data = await prepare(source, dest, guest)
    calls = 0

    async def slow(progress: MigrationProgress) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)  # a slow progress consumer: the point of the test

    started = time.monotonic()
    await source.live_migration(guest, "dst", migrate_data, slow)
    # first report (in flight during the whole fast copy) + the final one
    assert calls == 2
    assert time.monotonic() - started < 1.0  # 22 rounds x 0.1 s if it waited


async def test_failing_progress_callback_does_not_fail_the_migration(
    make_driver: MakeDriver,
) -> None:
    source, dest, guest = await two_hosts(make_driver)
    migrate_data = await prepare(source, dest, guest)

    async def broken(progress: MigrationProgress) -> None:
        raise ConnectionError("conductor unreachable")

    await source.live_migration(guest, "dst", migrate_data, broken)
    assert (await source.get_info("vm1")).phase is GuestPhase.MIGRATED_OUT


async def test_copy_failure_mid_way_leaves_the_guest_running_on_the_source(
    make_driver: MakeDriver,
) -> None:
    source, dest, guest = await two_hosts(make_driver)
    source.failures.inject("live_migration_copy", after_rounds=5)
    migrate_data = await prepare(source, dest, guest)
    rounds_seen: list[int] = []

    async def on_progress(progress: MigrationProgress) -> None:
        rounds_seen.append(progress.rounds)

    with pytest.raises(InjectedFailure) as err:
        await source.live_migration(guest, "dst", migrate_data, on_progress)
    assert err.value.step == "live_migration_copy"
    assert max(rounds_seen) == 5  # five rounds were copied before the failure
    assert (await source.get_info("vm1")).phase is GuestPhase.RUNNING


async def test_destroy_during_copy_aborts_the_migration(make_driver: MakeDriver) -> None:
    model = MigrationModel(round_interval_s=0.01, time_scale=1.0, stall_rounds=10_000)
    source, dest, guest = await two_hosts(make_driver, migration=model)
    await source.set_dirty_rate("vm1", 5000.0)
    migrate_data = await prepare(source, dest, guest)
    task = asyncio.create_task(source.live_migration(guest, "dst", migrate_data))
    await copy_rounds(source)
    await source.destroy(guest)
    with pytest.raises(MigrationAborted, match="destroyed"):
        await task
    assert await source.list_instance_uuids() == []


async def test_cleanup_host_stops_running_copies(make_driver: MakeDriver) -> None:
    model = MigrationModel(round_interval_s=0.01, time_scale=1.0, stall_rounds=10_000)
    source, dest, guest = await two_hosts(make_driver, migration=model)
    await source.set_dirty_rate("vm1", 5000.0)
    migrate_data = await prepare(source, dest, guest)
    task = asyncio.create_task(source.live_migration(guest, "dst", migrate_data))
    await copy_rounds(source)
    await source.cleanup_host()
    with pytest.raises(MigrationAborted, match="shutdown"):
        await task
    assert (await source.get_info("vm1")).phase is GuestPhase.RUNNING


async def test_hundred_fast_migrations_run_quickly(make_driver: MakeDriver) -> None:
    source = await make_driver("src", memory_mb=200_000)
    dest = await make_driver("dst", memory_mb=200_000)
    guests = [spec(f"vm{n}", memory_mb=1024) for n in range(100)]
    for guest in guests:
        await source.spawn(guest, "img")

    async def migrate(guest: GuestSpec) -> None:
        data = await prepare(source, dest, guest)
        await source.live_migration(guest, "dst", data)
        await dest.post_live_migration_at_destination(guest)
        await source.post_live_migration(guest)

    started = time.monotonic()
    await asyncio.gather(*(migrate(g) for g in guests))
    assert time.monotonic() - started < 3.0
    assert await source.list_instance_uuids() == []
    assert len(await dest.list_instance_uuids()) == 100


async def test_prechecks_refuse_bad_migrations(make_driver: MakeDriver) -> None:
    source, dest, guest = await two_hosts(make_driver)
    with pytest.raises(MigrationPreCheckError, match="is the source"):
        await source.check_can_live_migrate_destination(guest, "src")
    with pytest.raises(MigrationPreCheckError, match="already on"):
        await source.check_can_live_migrate_destination(guest, "other")
    await source.power_off(guest)
    dest_data = await dest.check_can_live_migrate_destination(guest, "src")
    with pytest.raises(MigrationPreCheckError, match="not running"):
        await source.check_can_live_migrate_source(guest, dest_data)


async def test_destination_without_room_refuses_in_check_and_pre(make_driver: MakeDriver) -> None:
    source = await make_driver("src")
    dest = await make_driver("dst", memory_mb=512)
    guest = spec("vm1", memory_mb=1024)
    await source.spawn(guest, "img")
    with pytest.raises(InsufficientResources):
        await dest.check_can_live_migrate_destination(guest, "src")
    migrate_data = await source.check_can_live_migrate_source(guest, {"dest_host": "dst"})
    with pytest.raises(InsufficientResources):
        await dest.pre_live_migration(guest, migrate_data)
    assert await dest.list_instance_uuids() == []


async def test_pre_live_migration_is_idempotent_for_the_same_source(
    make_driver: MakeDriver,
) -> None:
    source, dest, guest = await two_hosts(make_driver)
    migrate_data = await prepare(source, dest, guest)
    await dest.pre_live_migration(guest, migrate_data)  # redelivered
    assert await dest.list_instance_uuids() == ["vm1"]
    with pytest.raises(InstanceExists):
        await dest.pre_live_migration(guest, {**migrate_data, "source_host": "elsewhere"})


async def test_cleanup_calls_refuse_to_remove_the_live_copy(make_driver: MakeDriver) -> None:
    source, dest, guest = await two_hosts(make_driver)
    with pytest.raises(InvalidGuestState):
        await source.post_live_migration(guest)  # RUNNING here: it is the only copy
    migrate_data = await prepare(source, dest, guest)
    await source.live_migration(guest, "dst", migrate_data)
    await dest.post_live_migration_at_destination(guest)
    with pytest.raises(InvalidGuestState):
        await dest.rollback_live_migration_at_destination(guest)  # RUNNING there now
    await dest.post_live_migration_at_destination(guest)  # idempotent
    assert (await dest.get_info("vm1")).phase is GuestPhase.RUNNING


async def test_rollback_after_switch_over_resumes_the_source(make_driver: MakeDriver) -> None:
    source, dest, guest = await two_hosts(make_driver)
    migrate_data = await prepare(source, dest, guest)
    await source.live_migration(guest, "dst", migrate_data)
    await dest.rollback_live_migration_at_destination(guest)
    await source.rollback_live_migration_at_source(guest)
    assert (await source.get_info("vm1")).phase is GuestPhase.RUNNING
    assert await dest.list_instance_uuids() == []
    assert await source.get_volumes("vm1") == {"vol1": "/dev/vdb"}


async def test_migrating_a_guest_twice_at_once_is_refused(make_driver: MakeDriver) -> None:
    model = MigrationModel(round_interval_s=0.01, time_scale=1.0, stall_rounds=10_000)
    source, dest, guest = await two_hosts(make_driver, migration=model)
    await source.set_dirty_rate("vm1", 5000.0)
    migrate_data = await prepare(source, dest, guest)
    task = asyncio.create_task(source.live_migration(guest, "dst", migrate_data))
    await copy_rounds(source)
    with pytest.raises(InvalidGuestState):
        await source.live_migration(guest, "dst", migrate_data)
    await source.live_migration_abort("vm1")
    with pytest.raises(MigrationAborted):
        await task
