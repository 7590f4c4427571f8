"""Where the time of one object call goes, layer by layer (``objects.py``'s cost breakdown)."""

from __future__ import annotations

import datetime
import time
import uuid

from shared_objects.context import RequestContext
from shared_objects.objects import Flavor, Instance


async def layer_costs(db_url: str, calls: int = 2000) -> dict[str, float]:
    """CPU microseconds per call, in this process, without RPC: the database layer alone
    (``DbApi`` get / update) against the conductor's endpoint doing the same through objects
    (``get_by_uuid`` / ``save`` including (de)serialisation). The difference is what the object
    layer itself costs per request."""
    from conductor.db.session import Database
    from conductor.indirection import ConductorIndirectionEndpoint
    from shared_objects.base import obj_tree_get_versions
    from shared_objects.serializer import FleetObjectSerializer

    database = Database(db_url)
    endpoint = ConductorIndirectionEndpoint(database)
    serializer = FleetObjectSerializer()
    ctxt = RequestContext()
    async with database.request(ctxt):
        flavor = Flavor(ctxt, name=f"layer-{uuid.uuid4().hex[:6]}", vcpus=1, memory_mb=1, root_gb=1)
        await flavor.create()
        inst = Instance(ctxt, name="layer", host="h", node="n", flavor=flavor, vm_state="active")
        await inst.create()
    manifest = obj_tree_get_versions("Instance")

    async def db_get() -> None:
        async with database.request(RequestContext(), single_call=True) as db:
            await db.get("instances", {"uuid": inst.uuid})

    async def db_update() -> None:
        async with database.request(RequestContext(), single_call=True) as db:
            await db.update(
                "instances",
                {"uuid": inst.uuid},
                {"progress": 1, "updated_at": datetime.datetime.now(datetime.UTC)},
                returning=["updated_at"],
                standalone=True,
            )

    # As the agent of host "h" (the instance's host): the policy and the scope included.
    async def endpoint_get() -> None:
        c = RequestContext(caller="fleet-host-h")
        reply = await endpoint.object_class_action_versions(
            c, "Instance", "get_by_uuid", manifest, [inst.uuid], {}
        )
        await serializer.serialize_entity(c, reply)

    async def endpoint_save() -> None:
        c = RequestContext(caller="fleet-host-h")
        change = Instance(uuid=inst.uuid)
        change.obj_reset_changes()  # what an agent sends: the key, and the change
        change.progress = 2
        objinst = await serializer.deserialize_entity(c, change.obj_to_primitive())
        reply = await endpoint.object_action(c, objinst, "save", [], {})
        await serializer.serialize_entity(c, reply)

    out: dict[str, float] = {}
    try:
        for name, fn in (
            ("db_get_us", db_get),
            ("db_update_us", db_update),
            ("endpoint_get_us", endpoint_get),
            ("endpoint_save_us", endpoint_save),
        ):
            for _ in range(100):
                await fn()
            start = time.process_time()
            for _ in range(calls):
                await fn()
            out[name] = 1e6 * (time.process_time() - start) / calls
    finally:
        await database.dispose()
    return out
