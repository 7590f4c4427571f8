"""An agent-side process for the object acceptance test (run as a subprocess).

Configured only with FLEET_TRANSPORT_URL and FLEET_CONTROL_EXCHANGE (no database URL exists in
its environment). It drives objects through the conductor and prints one JSON report: what it
sent for each object, what it received, and the outcome of each step.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from conductor.testing import indirection
from shared_objects import exception
from shared_objects.base import FleetObject, obj_tree_get_versions
from shared_objects.context import RequestContext
from shared_objects.objects import Flavor, Instance, InstanceList
from shared_objects.rpc_clients.conductor import ConductorAPI
from shared_objects.runtime.config import load_config
from shared_objects.runtime.messaging import get_transport
from shared_objects.serializer import FleetObjectSerializer


class RecordingSerializer(FleetObjectSerializer):
    """Records every object primitive sent and every object received."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []

    async def serialize_entity(self, ctxt: Any, entity: Any) -> Any:
        wire = await super().serialize_entity(ctxt, entity)
        if isinstance(entity, FleetObject):
            self.sent.append(
                {
                    "name": entity.obj_name(),
                    "data": sorted(wire["versioned_object.data"]),
                    "changes": sorted(wire.get("versioned_object.changes", [])),
                }
            )
        return wire

    async def _object(self, ctxt: Any, primitive: dict[str, Any]) -> FleetObject:
        obj = await super()._object(ctxt, primitive)
        self._record(obj)
        return obj

    def _record(self, obj: FleetObject) -> None:
        self.received.append(
            {
                "name": obj.obj_name(),
                "version": obj.VERSION,
                "asked": obj_tree_get_versions(obj.obj_name())[obj.obj_name()],
                "fields": sorted(k for k in obj.fields if obj.obj_attr_is_set(k)),
            }
        )
        for name in obj.fields:
            if obj.obj_attr_is_set(name):
                value = getattr(obj, name)
                if isinstance(value, FleetObject):
                    self._record(value)
                elif isinstance(value, list):
                    for item in value:
                        if isinstance(item, FleetObject):
                            self._record(item)


async def read_only(ctxt: RequestContext, uuid: str, serializer: RecordingSerializer) -> Any:
    """Read one instance and its host's list; report what arrived."""
    inst = await Instance.get_by_uuid(ctxt, uuid, expected_attrs=["flavor"])
    listed = await InstanceList.get_by_host(ctxt, inst.host)
    return {
        "instance_version": inst.VERSION,
        "instance_fields": sorted(k for k in inst.fields if inst.obj_attr_is_set(k)),
        "listed": [i.uuid for i in listed],
        "received": serializer.received,
        "backports": serializer.backport_count,
    }


async def main() -> dict[str, Any]:
    assert not any("DATABASE" in k for k in os.environ), "agent must not see a database URL"
    cfg = load_config()
    serializer = RecordingSerializer()
    report: dict[str, Any] = {}
    transport = get_transport(cfg.messaging, allowed_remote_exmods=exception.ALLOWED_REMOTE_EXMODS)
    async with transport:
        api = ConductorAPI(
            transport, timeout=30.0, serializer=serializer, topic=os.environ["AGENT_TOPIC"]
        )
        with indirection(api):
            ctxt = RequestContext(user_id="agent", project_id="p1")
            if os.environ.get("AGENT_READ_UUID"):
                return await read_only(ctxt, os.environ["AGENT_READ_UUID"], serializer)  # type: ignore[no-any-return]
            report["ping"] = await api.ping(ctxt, "hello")
            flavor = Flavor(ctxt, name="m1.tiny", vcpus=1, memory_mb=512, root_gb=1)
            await flavor.create()
            inst = Instance(
                ctxt, name="vm-1", host="agent-host", node="n1", flavor=flavor, vm_state="building"
            )
            await inst.create()
            other = Instance(
                ctxt, name="vm-2", host="agent-host", node="n1", flavor=flavor, vm_state="building"
            )
            await other.create()
            report["uuids"] = [inst.uuid, other.uuid]

            got = await Instance.get_by_uuid(ctxt, inst.uuid, expected_attrs=["flavor"])
            report["flavor_name"] = got.flavor.name
            report["flavor_loaded_without_expected_attrs"] = (
                await Instance.get_by_uuid(ctxt, inst.uuid)
            ).obj_attr_is_set("flavor")

            got.task_state = "spawning"
            got.progress = 10
            mark = len(serializer.sent)
            await got.save(expected_task_state=None)
            report["save_sent"] = serializer.sent[mark:]
            report["after_save"] = {
                "changes": sorted(got.obj_what_changed()),
                "updated_at_set": got.updated_at is not None,
            }
            try:
                got.progress = 11
                await got.save(expected_task_state=None)
                report["cas_error"] = None
            except exception.UnexpectedTaskStateError as exc:
                report["cas_error"] = type(exc).__module__ + "." + type(exc).__qualname__

            listed = await InstanceList.get_by_host(ctxt, "agent-host")
            report["listed"] = sorted(i.uuid for i in listed)
            victim = next(i for i in listed if i.uuid == other.uuid)
            await victim.destroy()
            report["victim_deleted"] = victim.deleted
            report["listed_after_delete"] = sorted(
                i.uuid for i in await InstanceList.get_by_host(ctxt, "agent-host")
            )
            report["received"] = serializer.received
            report["backports"] = serializer.backport_count
    return report


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
    sys.stdout.flush()
