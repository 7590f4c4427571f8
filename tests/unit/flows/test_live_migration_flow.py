"""Live migration end to end in one process: the happy path, progress, bad requests."""

from __future__ import annotations

from typing import Any

import pytest
from live_migration_helpers import (
    FINISHED,
    boot,
    check_invariants,
    events,
    instance,
    settle_task,
    user,
    wait_migration,
)

from compute_agent.virt.migration_model import MigrationModel
from shared_objects import exception
from shared_objects.objects.migration import MigrationList
from shared_objects.testing.eventually import eventually

SLOWISH = MigrationModel(bandwidth_mb_s=2000, round_interval_s=0.02, progress_interval_s=0.01)


async def test_live_migration_moves_instance_and_usage(lm_fleet_factory: Any) -> None:
    async with lm_fleet_factory(migration=SLOWISH) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        mig = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-b")
        await settle_task(fleet, mig)
        got = await wait_migration(fleet, mig)
        assert got["status"] == "completed"
        assert (got["source_compute"], got["dest_compute"]) == ("host-a", "host-b")
        assert got["memory_total"] == 512 * 1024 * 1024
        assert got["memory_remaining"] is not None and got["memory_processed"] >= 512 * 2**20
        inst = await instance(fleet, uuid)
        assert (inst.host, inst.node, inst.task_state, inst.progress) == (
            "host-b",
            "host-b",
            None,
            100,
        )
        assert await fleet.driver("host-a").list_instance_uuids() == []
        assert (await fleet.driver("host-b").get_info(uuid)).phase.value == "running"
        assert not fleet.agents["host-a"].tracker.holds(uuid)
        assert fleet.agents["host-b"].tracker.holds(uuid)
        names = {e for e, _h, r in await events(fleet, uuid) if r == "Success"}
        assert {
            "compute_check_can_live_migrate_destination",
            "compute_check_can_live_migrate_source",
            "compute_pre_live_migration",
            "compute_live_migration",
            "compute_post_live_migration_at_destination",
        } <= names
        await check_invariants(fleet)


async def test_scheduler_picks_a_destination_other_than_the_source(lm_fleet_factory: Any) -> None:
    async with lm_fleet_factory(("host-a", "host-b", "host-c")) as fleet:
        (uuid,) = await boot(fleet, "host-b")
        mig = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid)
        await settle_task(fleet, mig)
        got = await wait_migration(fleet, mig)
        assert got["status"] == "completed"
        assert got["dest_compute"] in {"host-a", "host-c"}
        assert (await instance(fleet, uuid)).host == got["dest_compute"]
        await check_invariants(fleet)


async def test_progress_is_saved_and_monotonic(lm_fleet_factory: Any) -> None:
    slow = MigrationModel(bandwidth_mb_s=400, round_interval_s=0.05, progress_interval_s=0.05)
    async with lm_fleet_factory(migration=slow) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        mig = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-b")
        seen: list[tuple[int, int]] = []

        async def finished() -> dict[str, Any] | None:
            got = await fleet.tasks.get_migration(user(), migration_uuid=mig)
            if got["memory_processed"] is not None:
                seen.append((got["memory_processed"], got["progress"] or 0))
            return got if got["status"] in FINISHED else None

        got = await eventually(finished, 30)
        assert got["status"] == "completed"
        assert len({p for _m, p in seen}) >= 3, seen  # several intermediate reports
        assert [m for m, _p in seen] == sorted(m for m, _p in seen)
        assert [p for _m, p in seen] == sorted(p for _m, p in seen)
        assert seen[-1][1] == 100
        await settle_task(fleet, mig)
        await check_invariants(fleet)


async def test_ten_concurrent_migrations_all_complete(lm_fleet_factory: Any) -> None:
    async with lm_fleet_factory(migration=MigrationModel(time_scale=0)) as fleet:
        uuids = await boot(fleet, "host-a", count=10, ram=256)
        migs = [
            await fleet.tasks.live_migrate_instance(user(), instance_uuid=u, host="host-b")
            for u in uuids
        ]
        for mig in migs:
            await settle_task(fleet, mig)
            assert (await wait_migration(fleet, mig))["status"] == "completed"
        for u in uuids:
            assert (await instance(fleet, u)).host == "host-b"
        await check_invariants(fleet)
        await fleet.flush()
        async with fleet.db() as ctxt:
            from shared_objects.objects.compute_node import ComputeNodeList

            nodes = {n.host: n for n in await ComputeNodeList.get_all(ctxt)}
        assert (nodes["host-a"].memory_mb_used, nodes["host-b"].memory_mb_used) == (0, 2560)


@pytest.mark.parametrize(
    ("host", "setup", "message"),
    [
        ("host-a", None, "already on host-a"),
        ("ghost", None, "not a known compute host"),
        ("host-b", "not-active", "not ACTIVE"),
        ("host-b", "busy", "busy"),
    ],
)
async def test_bad_requests_change_nothing(
    lm_fleet_factory: Any, host: str, setup: str | None, message: str
) -> None:
    async with lm_fleet_factory() as fleet:
        (uuid,) = await boot(fleet, "host-a")
        if setup is not None:
            async with fleet.db() as ctxt:
                from shared_objects.objects.instance import Instance

                inst = await Instance.get_by_uuid(ctxt, uuid)
                if setup == "not-active":
                    inst.vm_state = "stopped"
                else:
                    inst.task_state = "rebooting"
                await inst.save()
        with pytest.raises(exception.InvalidRequest, match=message):
            await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host=host)
        async with fleet.db() as ctxt:
            assert len(await MigrationList.get_by_instance(ctxt, uuid)) == 0
        inst = await instance(fleet, uuid)
        assert inst.host == "host-a"


async def test_unknown_instance_is_not_found(lm_fleet_factory: Any) -> None:
    async with lm_fleet_factory() as fleet:
        with pytest.raises(exception.InstanceNotFound):
            await fleet.tasks.live_migrate_instance(
                user(), instance_uuid="6b1c6a5e-0000-4000-8000-000000000000", host="host-b"
            )


async def test_second_migration_of_a_migrating_instance_is_refused(lm_fleet_factory: Any) -> None:
    slow = MigrationModel(bandwidth_mb_s=200, round_interval_s=0.05)
    async with lm_fleet_factory(migration=slow) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        first = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-b")
        with pytest.raises(exception.InvalidRequest, match="busy"):
            await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-b")
        async with fleet.db() as ctxt:
            assert [m.uuid for m in await MigrationList.get_by_instance(ctxt, uuid)] == [first]
        await settle_task(fleet, first)
        assert (await wait_migration(fleet, first))["status"] == "completed"
        await check_invariants(fleet)


async def test_volumes_and_firewall_follow_the_guest_and_detach_works_after(
    lm_fleet_factory: Any,
) -> None:
    from compute_agent.virt import normalize_rules
    from shared_objects.objects.flavor import Flavor
    from shared_objects.objects.security_group import SecurityGroup
    from shared_objects.objects.security_group_rule import SecurityGroupRule

    async with lm_fleet_factory(migration=SLOWISH) as fleet:
        async with fleet.db() as ctxt:
            await Flavor(ctxt, name="vol", vcpus=1, memory_mb=512, root_gb=1).create()
            group = SecurityGroup(ctxt, name="web", project_id="p1", user_id="u1")
            await group.create()
            await SecurityGroupRule(
                ctxt,
                parent_group_id=group.id,
                protocol="tcp",
                from_port=22,
                to_port=22,
                cidr="10.0.0.0/8",
            ).create()
        (made,) = await fleet.tasks.build_instances(
            user(),
            flavor="vol",
            name="vm",
            forced_host="host-a",
            security_groups=["web"],
            block_device_mappings=[{"volume_id": "vol-1", "device_name": "/dev/vdb"}],
        )
        uuid = made["uuid"]

        async def active() -> bool:
            return (await instance(fleet, uuid)).vm_state == "active"

        await eventually(active)
        rules_before = await fleet.driver("host-a").get_firewall_rules(uuid)
        assert rules_before == normalize_rules(
            [{"protocol": "tcp", "from_port": 22, "to_port": 22, "cidr": "10.0.0.0/8"}]
        )
        mig = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-b")
        await settle_task(fleet, mig)
        assert (await wait_migration(fleet, mig))["status"] == "completed"
        assert await fleet.driver("host-b").get_volumes(uuid) == {"vol-1": "/dev/vdb"}
        assert await fleet.driver("host-b").get_firewall_rules(uuid) == rules_before
        await fleet.tasks.detach_volume(user(), instance_uuid=uuid, volume_id="vol-1")
        assert await fleet.driver("host-b").get_volumes(uuid) == {}
        await check_invariants(fleet)


async def test_second_migration_starts_its_progress_from_zero(lm_fleet_factory: Any) -> None:
    async with lm_fleet_factory(migration=SLOWISH) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        first = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-b")
        await settle_task(fleet, first)
        assert (await instance(fleet, uuid)).progress == 100
        fleet.driver("host-a").failures.delay("pre_live_migration", 0.5, count=1)
        second = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-a")
        assert (await fleet.tasks.get_migration(user(), migration_uuid=second))["progress"] == 0
        await settle_task(fleet, second)
        assert (await wait_migration(fleet, second))["status"] == "completed"
        assert (await instance(fleet, uuid)).host == "host-a"
        await check_invariants(fleet)
