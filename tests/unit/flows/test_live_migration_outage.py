"""A live migration through a database outage at its switch-over (issue 13, deliver 1)."""

from __future__ import annotations

from typing import Any

from live_migration_helpers import (
    boot,
    check_invariants,
    instance,
    settle_task,
    user,
    wait_migration,
)

from compute_agent.virt.migration_model import MigrationModel
from shared_objects.testing.fleet import DatabaseOutage

SLOWISH = MigrationModel(bandwidth_mb_s=2000, round_interval_s=0.02, progress_interval_s=0.01)


async def test_outage_at_the_switch_over_still_completes_the_migration(
    lm_fleet_factory: Any,
) -> None:
    async with lm_fleet_factory(migration=SLOWISH) as fleet:
        (uuid,) = await boot(fleet, "host-a")
        outage = DatabaseOutage(fleet.database)
        dest = fleet.driver("host-b")
        resume = dest.post_live_migration_at_destination

        async def resume_then_outage(*args: Any, **kwargs: Any) -> Any:
            # The destination resumed the guest; now it must move the instance to itself
            # and the source must record the end, while the database is away.
            outage.for_seconds(1.5)
            return await resume(*args, **kwargs)

        dest.post_live_migration_at_destination = resume_then_outage
        mig = await fleet.tasks.live_migrate_instance(user(), instance_uuid=uuid, host="host-b")
        await settle_task(fleet, mig)
        got = await wait_migration(fleet, mig)
        assert outage.refused > 0
        assert got["status"] == "completed"
        inst = await instance(fleet, uuid)
        assert (inst.host, inst.task_state) == ("host-b", None)
        assert await fleet.driver("host-a").list_instance_uuids() == []
        await check_invariants(fleet)
