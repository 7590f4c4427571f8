"""Crash at every point of a live migration: both hosts' states always resolve to one home."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from virt_testlib import FAST, MakeDriver, crash_copy, spec

from compute_agent.virt import (
    FakeDriver,
    FakeDriverConfig,
    GuestPhase,
    GuestRef,
    MigrationAborted,
    MigrationModel,
    Outcome,
    resolve_migration,
)
from shared_objects.testing.fleet import copy_rounds

P = GuestPhase


@pytest.mark.parametrize(
    ("source", "dest", "outcome", "steps"),
    [
        (P.RUNNING, None, Outcome.SOURCE, []),
        (P.RUNNING, P.INCOMING, Outcome.SOURCE, ["dest:rollback_live_migration_at_destination"]),
        (P.MIGRATING_OUT, P.INCOMING, Outcome.IN_PROGRESS, []),
        (
            P.MIGRATED_OUT,
            P.INCOMING,
            Outcome.DEST,
            ["dest:post_live_migration_at_destination", "source:post_live_migration"],
        ),
        (P.MIGRATED_OUT, P.RUNNING, Outcome.DEST, ["source:post_live_migration"]),
        (P.MIGRATED_OUT, None, Outcome.SOURCE, ["source:rollback_live_migration_at_source"]),
        (None, P.RUNNING, Outcome.DEST, []),
        (None, P.INCOMING, Outcome.LOST, ["dest:rollback_live_migration_at_destination"]),
        (None, None, Outcome.LOST, []),
        (P.RUNNING, P.RUNNING, Outcome.CONFLICT, []),
        (P.STOPPED, P.INCOMING, Outcome.SOURCE, ["dest:rollback_live_migration_at_destination"]),
    ],
)
def test_resolution_table(
    source: GuestPhase | None, dest: GuestPhase | None, outcome: Outcome, steps: list[str]
) -> None:
    resolution = resolve_migration(source, dest)
    assert resolution.outcome is outcome
    assert [f"{side}:{name}" for side, name in resolution.steps] == steps
    assert resolution.switched_over == (outcome is Outcome.DEST)


#: The migration sequence as the agents run it; a crash may happen after any prefix of it.
SEQUENCE = [
    "pre_live_migration",
    "live_migration",
    "post_live_migration_at_destination",
    "post_live_migration",
]


async def run_prefix(source: FakeDriver, dest: FakeDriver, count: int) -> None:
    guest = spec("vm")
    data = await source.check_can_live_migrate_source(guest, {"dest_host": "dst"})
    for name in SEQUENCE[:count]:
        if name == "pre_live_migration":
            await dest.pre_live_migration(guest, data)
        elif name == "live_migration":
            await source.live_migration(guest, "dst", data)
        elif name == "post_live_migration_at_destination":
            await dest.post_live_migration_at_destination(guest)
        else:
            await source.post_live_migration(guest)


async def reload(state_dir: Path, host: str, into: Path) -> FakeDriver:
    """A restarted agent's driver, from a copy of the state the crash left."""
    driver = FakeDriver(
        FakeDriverConfig(
            state_dir=crash_copy(state_dir, host, into), spawn_delay_s=0, migration=FAST
        )
    )
    await driver.init_host(host)
    return driver


async def phase_of(driver: FakeDriver) -> GuestPhase | None:
    return await driver.get_phase("vm")


@pytest.mark.parametrize("done", range(len(SEQUENCE) + 1))
async def test_crash_after_any_step_ends_with_exactly_one_running_guest(
    make_driver: MakeDriver, state_dir: Path, tmp_path: Path, done: int
) -> None:
    source = await make_driver("src")
    dest = await make_driver("dst")
    await source.spawn(spec("vm"), "img", [{"volume_id": "v", "mountpoint": "/dev/vdb"}])
    await run_prefix(source, dest, done)

    # both agents die here and restart
    new_source = await reload(state_dir, "src", tmp_path / "after-src")
    new_dest = await reload(state_dir, "dst", tmp_path / "after-dst")
    resolution = resolve_migration(await phase_of(new_source), await phase_of(new_dest))
    assert resolution.outcome in (Outcome.SOURCE, Outcome.DEST)
    assert resolution.switched_over == (done >= 2)  # the switch-over is live_migration's return
    for side, method in resolution.steps:
        driver = new_source if side == "source" else new_dest
        await getattr(driver, method)(GuestRef("vm"))
        # applying the steps again (a second crash and retry) is harmless
        await getattr(driver, method)(GuestRef("vm"))

    home, other = (new_dest, new_source) if resolution.switched_over else (new_source, new_dest)
    info = await home.get_info("vm")
    assert info.phase is GuestPhase.RUNNING
    assert info.volumes == {"v": "/dev/vdb"}
    assert not await other.instance_exists("vm")
    assert (await other.get_available_resource()).memory_mb_used == 0


async def test_crash_mid_copy_resolves_to_the_source(
    make_driver: MakeDriver, state_dir: Path, tmp_path: Path
) -> None:
    slow = MigrationModel(round_interval_s=0.01, stall_rounds=10_000)
    source = await make_driver("src", migration=slow)
    dest = await make_driver("dst", migration=slow)
    guest = spec("vm")
    await source.spawn(guest, "img")
    await source.set_dirty_rate("vm", 10_000.0)
    data = await source.check_can_live_migrate_source(guest, {"dest_host": "dst"})
    await dest.pre_live_migration(guest, data)
    copy = asyncio.create_task(source.live_migration(guest, "dst", data))
    await copy_rounds(source)
    assert resolve_migration(await phase_of(source), await phase_of(dest)).outcome is (
        Outcome.IN_PROGRESS
    )

    new_source = await reload(state_dir, "src", tmp_path / "after-src")
    new_dest = await reload(state_dir, "dst", tmp_path / "after-dst")
    await source.live_migration_abort("vm")  # end the original copy; the crash copies are frozen
    with pytest.raises(MigrationAborted):
        await copy

    resolution = resolve_migration(await phase_of(new_source), await phase_of(new_dest))
    assert resolution.outcome is Outcome.SOURCE
    for side, method in resolution.steps:
        await getattr(new_source if side == "source" else new_dest, method)(GuestRef("vm"))
    assert (await new_source.get_info("vm")).phase is GuestPhase.RUNNING
    assert not await new_dest.instance_exists("vm")
