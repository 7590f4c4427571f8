"""Release 1.1: a locked instance can be neither deleted nor live-migrated until unlocked."""

from __future__ import annotations

from typing import Any

import pytest

from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.instance import Instance

OPS = RequestContext(user_id="ops", project_id="p1")


async def test_lock_blocks_delete_and_live_migration_until_unlocked(
    fleet_factory: Any, wait_for: Any
) -> None:
    async with fleet_factory() as fleet:
        async with fleet.db() as ctxt:
            await Flavor(ctxt, name="small", vcpus=1, memory_mb=256, root_gb=1).create()
        (made,) = await fleet.tasks.build_instances(OPS, flavor="small", name="vm")
        uuid = made["uuid"]

        async def active() -> bool:
            async with fleet.db() as ctxt:
                inst = await Instance.get_by_uuid(ctxt, uuid)
            return inst.vm_state == "active" and inst.task_state is None

        await wait_for(active)
        with pytest.raises(exception.InvalidRequest, match="a lock needs a reason"):
            await fleet.tasks.lock_instance(OPS, instance_uuid=uuid, reason=" ")
        await fleet.tasks.lock_instance(OPS, instance_uuid=uuid, reason="audit hold")
        with pytest.raises(exception.InvalidRequest, match="locked: audit hold"):
            await fleet.tasks.delete_instance(OPS, instance_uuid=uuid)
        with pytest.raises(exception.InvalidRequest, match="locked: audit hold"):
            await fleet.tasks.live_migrate_instance(OPS, instance_uuid=uuid, host="host-b")
        async with fleet.db() as ctxt:
            inst = await Instance.get_by_uuid(ctxt, uuid)
        assert (inst.locked, inst.locked_reason, inst.task_state) == (True, "audit hold", None)

        await fleet.tasks.unlock_instance(OPS, instance_uuid=uuid)
        await fleet.tasks.delete_instance(OPS, instance_uuid=uuid)

        async def deleted() -> bool:
            async with fleet.db() as ctxt:
                rows = await ctxt.db.select("instances", {"uuid": uuid})
            return bool(rows and rows[0]["deleted"])

        await wait_for(deleted)


def test_instance_1_1_drops_the_lock_for_1_0_readers() -> None:
    inst = Instance(uuid="3f0b1b6c-2b9e-4b7e-9d1c-4a3e2c7a2b11", locked=True, locked_reason="x")
    old = inst.obj_to_primitive(target_version="1.0")
    assert old["versioned_object.version"] == "1.0"
    assert "locked" not in old["versioned_object.data"]
    assert "locked_reason" not in old["versioned_object.data"]
