"""The fleet invariant checker notices each kind of breakage (a checker that cannot fail is no
check), and both services' live-migration settings come from the one ``[live_migration]``
section."""

from __future__ import annotations

from typing import Any

import pytest
from live_migration_helpers import boot

from compute_agent.live_migration import LiveMigrationSettings
from compute_agent.testing_invariants import (
    InvariantViolation,
    assert_fleet_invariants,
    check_fleet_invariants,
    driver_views,
)
from compute_agent.virt.models import GuestSpec
from conductor.tasks.live_migration import LiveMigrationTaskSettings
from shared_objects.objects.compute_node import ComputeNode
from shared_objects.objects.instance import Instance


async def _problems(fleet: Any, with_claims: bool = True) -> list[str]:
    await fleet.flush()
    drivers = {h: a.driver for h, a in fleet.agents.items()}
    claims = {h: a.tracker.claims.claimed_uuids for h, a in fleet.agents.items()}
    async with fleet.db() as ctxt:
        return await check_fleet_invariants(
            ctxt, await driver_views(drivers), claims=claims if with_claims else None
        )


async def test_a_healthy_fleet_has_no_violations(lm_fleet_factory: Any) -> None:
    async with lm_fleet_factory() as fleet:
        await boot(fleet, "host-a", count=2)
        assert await _problems(fleet) == []


async def test_guest_on_two_hypervisors_is_reported(lm_fleet_factory: Any) -> None:
    async with lm_fleet_factory() as fleet:
        (uuid,) = await boot(fleet, "host-a")
        await fleet.driver("host-b").spawn(GuestSpec(uuid, memory_mb=512), "img")
        problems = await _problems(fleet, with_claims=False)
        assert any("runs on 2 hypervisors" in p for p in problems), problems


async def test_database_host_disagreeing_with_hypervisor_is_reported(
    lm_fleet_factory: Any,
) -> None:
    async with lm_fleet_factory() as fleet:
        (uuid,) = await boot(fleet, "host-a")
        async with fleet.db() as ctxt:
            inst = await Instance.get_by_uuid(ctxt, uuid)
            inst.host = "host-b"
            await inst.save()
        problems = await _problems(fleet, with_claims=False)
        assert any("database says host host-b, hypervisor host-a" in p for p in problems)


async def test_task_state_left_set_and_paused_copy_are_reported(lm_fleet_factory: Any) -> None:
    async with lm_fleet_factory() as fleet:
        (uuid,) = await boot(fleet, "host-a")
        async with fleet.db() as ctxt:
            inst = await Instance.get_by_uuid(ctxt, uuid)
            inst.task_state = "migrating"
            await inst.save()
        a, b = fleet.driver("host-a"), fleet.driver("host-b")
        data = await a.check_can_live_migrate_source(
            inst, await b.check_can_live_migrate_destination(inst, "host-a")
        )
        await b.pre_live_migration(inst, data)
        problems = await _problems(fleet, with_claims=False)
        assert any("task_state 'migrating' left set" in p for p in problems), problems
        assert any("host-b: guest" in p and "incoming" in p for p in problems), problems


async def test_usage_and_claims_mismatches_are_reported(lm_fleet_factory: Any) -> None:
    async with lm_fleet_factory() as fleet:
        (uuid,) = await boot(fleet, "host-a")
        await fleet.flush()
        async with fleet.db() as ctxt:
            node = await ComputeNode.get_by_host_and_nodename(ctxt, "host-b", "host-b")
            node.memory_mb_used = 999
            await node.save()
        fleet.agents["host-a"].tracker.release(uuid)
        drivers = {h: a.driver for h, a in fleet.agents.items()}
        claims = {h: a.tracker.claims.claimed_uuids for h, a in fleet.agents.items()}
        async with fleet.db() as ctxt:
            with pytest.raises(InvariantViolation) as err:
                await assert_fleet_invariants(ctxt, await driver_views(drivers), claims=claims)
        text = "\n".join(err.value.violations)
        assert "compute node host-b: usage" in text
        assert f"host-a: claims for [] without instances, instances ['{uuid}']" in text


def test_both_services_take_their_settings_from_the_live_migration_section() -> None:
    from shared_objects.runtime.config import load_config

    cfg = load_config(
        {
            "FLEET_LIVE_MIGRATION__CALL_MONITOR_TIMEOUT": "4",
            "FLEET_LIVE_MIGRATION__MAX_CONCURRENT": "3",
            "FLEET_LIVE_MIGRATION__MAX_ATTEMPTS": "5",
            "FLEET_SERVICE__SERVICE_DOWN_TIME": "30",
        }
    )
    agent = LiveMigrationSettings.from_config(cfg.live_migration)
    assert (agent.call_monitor_timeout, agent.max_concurrent) == (4.0, 3)
    conductor = LiveMigrationTaskSettings.from_config(
        cfg.live_migration, cfg.service.service_down_time
    )
    assert (conductor.call_monitor_timeout, conductor.max_attempts) == (4.0, 5)
    assert conductor.service_down_time == 30.0


def test_settings_defaults_are_the_sections_defaults() -> None:
    from shared_objects.runtime.config import LiveMigrationConfig

    section = LiveMigrationConfig()
    assert LiveMigrationSettings.from_config(section) == LiveMigrationSettings()
    assert LiveMigrationTaskSettings.from_config(section, 60.0) == LiveMigrationTaskSettings()


async def test_peer_settle_refuses_steps_outside_the_allowed_list(lm_fleet_factory: Any) -> None:
    from shared_objects import exception
    from shared_objects.context import RequestContext

    async with lm_fleet_factory() as fleet:
        (uuid,) = await boot(fleet, "host-a")
        async with fleet.db() as ctxt:
            inst = await Instance.get_by_uuid(ctxt, uuid)
        # host-b takes part in no migration of the instance: host-a refuses it as a peer
        # before looking at the steps (a conductor asking is refused on the steps instead).
        compute = fleet.agents["host-b"].compute
        with pytest.raises(exception.Forbidden, match="settle_live_migration_peer"):
            await compute.settle_live_migration_peer(
                RequestContext(user_id="compute"),
                "host-a",
                instance=inst,
                steps=["post_live_migration", "destroy"],
                owner=None,
                call_monitor_timeout=2,
                timeout=10,
            )
        with pytest.raises(exception.InvalidRequest, match="unknown live-migration step"):
            await fleet.endpoint.live_migration.compute.settle_live_migration_peer(
                RequestContext(user_id="conductor"),
                "host-a",
                instance=inst,
                steps=["post_live_migration", "destroy"],
                owner=None,
                call_monitor_timeout=2,
                timeout=10,
            )
        assert (await fleet.driver("host-a").get_info(uuid)).phase.value == "running"
