"""ComputeNode: one hypervisor's capacity, usage and allocation ratios."""

from __future__ import annotations

import uuid as uuidlib
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
from shared_objects.objects._common import copy_row, utcnow

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
        copy_row(node, row)
        node._context = context
        node.obj_reset_changes()
        return node

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
        if self.obj_attr_is_set("id"):
            raise exception.ObjectAlreadyCreated(objname="ComputeNode")
        if not self.obj_attr_is_set("uuid"):
            self.uuid = str(uuidlib.uuid4())
        self.obj_set_defaults()
        values = self.obj_get_changes()
        values["created_at"] = utcnow()
        row = await get_db(self._context, "ComputeNode", "create").insert(TABLE, values)
        self._from_db_object(self._context, self, row)

    @remotable(send_changes_only=True)
    async def save(self) -> None:
        values = self.obj_get_changes()
        if not values:
            return
        values["updated_at"] = utcnow()
        rows = await get_db(self._context, "ComputeNode", "save").update(
            TABLE, {"id": self.id}, values, returning=["updated_at"], standalone=True
        )
        if not rows:
            raise exception.ComputeHostNotFound(host=self.id, node=None)
        self.updated_at = rows[0]["updated_at"]
        self.obj_reset_changes()

    @remotable(send_changes_only=True)
    async def destroy(self) -> None:
        now = utcnow()
        rows = await get_db(self._context, "ComputeNode", "destroy").update(
            TABLE,
            {"id": self.id, "deleted": False},
            {"deleted": True, "deleted_at": now},
            returning=["deleted_at"],
        )
        if not rows:
            raise exception.ComputeHostNotFound(host=self.id, node=None)
        self.deleted = True
        self.deleted_at = rows[0]["deleted_at"]
        self.obj_reset_changes()


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
    def _from_rows(cls, context: Any, rows: list[dict[str, Any]]) -> ComputeNodeList:
        result = cls(
            context, objects=[ComputeNode._from_db_object(context, ComputeNode(), r) for r in rows]
        )
        result.obj_reset_changes()
        return result

    @classmethod
    @remotable
    async def get_all(cls, context: Any) -> ComputeNodeList:
        rows = await get_db(context, "ComputeNodeList", "get_all").select(TABLE, {"deleted": False})
        return cls._from_rows(context, rows)

    @classmethod
    @remotable
    async def get_all_by_host(cls, context: Any, host: str) -> ComputeNodeList:
        rows = await get_db(context, "ComputeNodeList", "get_all_by_host").select(
            TABLE, {"host": host, "deleted": False}
        )
        return cls._from_rows(context, rows)
