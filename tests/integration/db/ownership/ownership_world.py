"""The world the ownership tests act on: two hosts' sides (instance, node, service, migration,
actions, ...), callers acting as an agent of a host, and ``refused`` (Forbidden, nothing changed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from conductor.db.ownership import OwnerScope
from conductor.db.session import Database
from conductor.testing import snapshot
from shared_objects import exception, releases
from shared_objects.context import RequestContext
from shared_objects.fields import VMState
from shared_objects.objects import (
    BlockDeviceMapping,
    ComputeNode,
    Flavor,
    Instance,
    InstanceAction,
    InstanceActionEvent,
    InstanceFault,
    Migration,
    SecurityGroup,
    SecurityGroupList,
    SecurityGroupRule,
    Service,
)

H1, H2, H3 = "h1", "h2", "h3"
REQ = "req-ownership"
NOBODY = "0b7c3f33-52a7-4f8e-9d55-3c1f0f0c0a11"


Call = Callable[[RequestContext], Awaitable[Any]]


class Caller:
    """Runs object calls the way the indirection endpoint does: one unit of work per call,
    scoped to ``host`` (None: unscoped, as for a conductor or an operator)."""

    def __init__(self, database: Database, host: str | None) -> None:
        self.database = database
        self.scope = None if host is None else OwnerScope(frozenset({host}), f"fleet-host-{host}")
        self.statements = 0

    async def __call__(self, call: Call, *objects: Any, request_id: str = REQ) -> Any:
        ctxt = RequestContext(request_id=request_id, user_id="u1", project_id="p1")
        async with self.database.request(ctxt, single_call=True, scope=self.scope) as db:
            for obj in objects:
                obj._context = ctxt
            try:
                return await call(ctxt)
            finally:
                self.statements = db.statements


@dataclasses.dataclass
class Side:
    """One host's belongings."""

    instance: Instance
    node: ComputeNode
    service: Service
    bdm: BlockDeviceMapping
    action: InstanceAction
    event: InstanceActionEvent
    fault: InstanceFault
    group: SecurityGroup
    rule: SecurityGroupRule


@dataclasses.dataclass
class World:
    database: Database
    flavor: Flavor
    mine: Side
    theirs: Side
    conductor_service: Service

    def agent(self, host: str | None = H1) -> Caller:
        return Caller(self.database, host)

    async def instance(self, host: str | None, **values: Any) -> Instance:
        values.setdefault("vm_state", VMState.ACTIVE)
        return await self.agent(None)(
            lambda c: _create(Instance(c, flavor=self.flavor, host=host, node=host, **values))
        )

    async def migration(self, instance: Instance, source: str, dest: str, status: str) -> Migration:
        return await self.agent(None)(
            lambda c: _create(
                Migration(
                    c,
                    instance_uuid=instance.uuid,
                    source_compute=source,
                    dest_compute=dest,
                    source_node=source,
                    dest_node=dest,
                    status=status,
                    migration_type="live-migration",
                )
            )
        )

    async def reload(self, instance: Instance) -> Instance:
        found: Instance = await self.agent(None)(lambda c: Instance.get_by_uuid(c, instance.uuid))
        return found


async def _create(obj: Any) -> Any:
    await obj.create()
    return obj


async def _side(ctxt: RequestContext, flavor: Flavor, host: str) -> Side:
    group = await _create(SecurityGroup(ctxt, name=f"sg-{host}", project_id="p1"))
    rule = await _create(
        SecurityGroupRule(
            ctxt, parent_group_id=group.id, protocol="tcp", from_port=22, to_port=22, cidr="::/0"
        )
    )
    instance = await _create(
        Instance(
            ctxt,
            flavor=flavor,
            name=f"vm-{host}",
            user_id="u1",
            project_id="p1",
            host=host,
            node=host,
            vm_state=VMState.ACTIVE,
            security_groups=SecurityGroupList(ctxt, objects=[group]),
        )
    )
    node = await _create(ComputeNode(ctxt, host=host, hypervisor_hostname=host, vcpus=8))
    service = await Service.register(ctxt, host, releases.BINARY_COMPUTE, "compute", 1)
    bdm = await _create(
        BlockDeviceMapping(
            ctxt,
            instance_uuid=instance.uuid,
            volume_id=f"vol-{host}",
            source_type="volume",
            destination_type="volume",
            device_name="/dev/vdb",
        )
    )
    action = await InstanceAction.action_start(ctxt, instance.uuid, "create")
    event = await InstanceActionEvent.event_start(ctxt, instance.uuid, "compute_x", host)
    fault = await _create(
        InstanceFault(ctxt, instance_uuid=instance.uuid, code=500, message="boom", host=host)
    )
    return Side(instance, node, service, bdm, action, event, fault, group, rule)


async def refused(world: World, call: Call, *objects: Any, host: str = H1) -> exception.Forbidden:
    """``call`` as an agent of ``host`` is Forbidden and changes nothing."""
    before = await snapshot(world.database)
    with pytest.raises(exception.Forbidden) as caught:
        await world.agent(host)(call, *objects)
    assert await snapshot(world.database) == before
    assert f"fleet-host-{host}" in str(caught.value)
    return caught.value
