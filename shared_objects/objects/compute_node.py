"""ComputeNode: one hypervisor's capacity, usage and allocation ratios."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared_objects import exception, fields
from shared_objects.base import (
    FleetObject,
    FleetObjectRegistry,
    FleetPersistentObject,
    ObjectListBase,
    get_db,
    remotable,
)
from shared_objects.objects._common import (
    from_row,
    insert_row,
    list_from_rows,
    save_changes,
    soft_delete,
)

TABLE = "compute_nodes"


@FleetObjectRegistry.register
class ComputeNode(FleetPersistentObject, FleetObject):
    """What a hypervisor offers and what is used of it, reported by its agent."""

    # Version 1.0: Initial version
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    id: int
    uuid: str
    host: str
    hypervisor_hostname: str
    hypervisor_type: str
    vcpus: int
    memory_mb: int
    local_gb: int
    vcpus_used: int
    memory_mb_used: int
    local_gb_used: int
    running_vms: int
    cpu_allocation_ratio: float
    ram_allocation_ratio: float
    disk_allocation_ratio: float

    fields = {
        "id": fields.IntegerField(),
        "uuid": fields.UUIDField(),
        "host": fields.StringField(),
        "hypervisor_hostname": fields.StringField(),
        "hypervisor_type": fields.StringField(default="fake"),
        "vcpus": fields.NonNegativeIntegerField(default=0),
        "memory_mb": fields.NonNegativeIntegerField(default=0),
        "local_gb": fields.NonNegativeIntegerField(default=0),
        "vcpus_used": fields.NonNegativeIntegerField(default=0),
        "memory_mb_used": fields.NonNegativeIntegerField(default=0),
        "local_gb_used": fields.NonNegativeIntegerField(default=0),
        "running_vms": fields.NonNegativeIntegerField(default=0),
        "cpu_allocation_ratio": fields.NonNegativeFloatField(default=16.0),
        "ram_allocation_ratio": fields.NonNegativeFloatField(default=1.5),
        "disk_allocation_ratio": fields.NonNegativeFloatField(default=1.0),
    }

    @staticmethod
    def _from_db_object(context: Any, node: ComputeNode, row: Mapping[str, Any]) -> ComputeNode:
        return from_row(context, node, row)

    @classmethod
    @remotable
    async def get_by_id(cls, context: Any, compute_id: int) -> ComputeNode:
        row = await get_db(context, "ComputeNode", "get_by_id").get(
            TABLE, {"id": compute_id, "deleted": False}
        )
        if row is None:
            raise exception.ComputeHostNotFound(host=compute_id, node=None)
        return cls._from_db_object(context, cls(), row)

    @classmethod
    @remotable
    async def get_by_host_and_nodename(cls, context: Any, host: str, nodename: str) -> ComputeNode:
        row = await get_db(context, "ComputeNode", "get_by_host_and_nodename").get(
            TABLE, {"host": host, "hypervisor_hostname": nodename, "deleted": False}
        )
        if row is None:
            raise exception.ComputeHostNotFound(host=host, node=nodename)
        return cls._from_db_object(context, cls(), row)

    @remotable
    async def create(self) -> None:
        await insert_row(self, TABLE, defaults="all", new_uuid=True)

    @remotable(send_changes_only=True)
    async def save(self) -> None:
        await save_changes(
            self, TABLE, lambda: exception.ComputeHostNotFound(host=self.id, node=None)
        )

    @remotable(send_changes_only=True)
    async def destroy(self) -> None:
        await soft_delete(
            self, TABLE, lambda: exception.ComputeHostNotFound(host=self.id, node=None)
        )


@FleetObjectRegistry.register
class ComputeNodeList(ObjectListBase[ComputeNode], FleetObject):
    # Version 1.0: Initial version
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    objects: Any

    fields = {
        "objects": fields.ListOfObjectsField("ComputeNode"),
    }

    @classmethod
    @remotable
    async def get_all(cls, context: Any) -> ComputeNodeList:
        rows = await get_db(context, "ComputeNodeList", "get_all").select(TABLE, {"deleted": False})
        return list_from_rows(cls, context, rows, ComputeNode)

    @classmethod
    @remotable
    async def get_all_by_host(cls, context: Any, host: str) -> ComputeNodeList:
        rows = await get_db(context, "ComputeNodeList", "get_all_by_host").select(
            TABLE, {"host": host, "deleted": False}
        )
        return list_from_rows(cls, context, rows, ComputeNode)
