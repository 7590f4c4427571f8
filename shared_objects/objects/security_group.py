"""SecurityGroup: a named set of firewall rules that instances belong to."""

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

TABLE = "security_groups"


@FleetObjectRegistry.register
class SecurityGroup(FleetPersistentObject, FleetObject):
    # Version 1.0: Initial version
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    id: int
    uuid: str
    name: str
    description: str | None
    user_id: str | None
    project_id: str | None

    fields = {
        "id": fields.IntegerField(),
        "uuid": fields.UUIDField(),
        "name": fields.StringField(),
        "description": fields.StringField(nullable=True),
        "user_id": fields.StringField(nullable=True),
        "project_id": fields.StringField(nullable=True),
    }

    @staticmethod
    def _from_db_object(
        context: Any, group: SecurityGroup, row: Mapping[str, Any]
    ) -> SecurityGroup:
        copy_row(group, row)
        group._context = context
        group.obj_reset_changes()
        return group

    @classmethod
    @remotable
    async def get_by_id(cls, context: Any, security_group_id: int) -> SecurityGroup:
        row = await get_db(context, "SecurityGroup", "get_by_id").get(
            TABLE, {"id": security_group_id, "deleted": False}
        )
        if row is None:
            raise exception.SecurityGroupNotFound(security_group_id=security_group_id)
        return cls._from_db_object(context, cls(), row)

    @classmethod
    @remotable
    async def get_by_name(cls, context: Any, project_id: str, name: str) -> SecurityGroup:
        row = await get_db(context, "SecurityGroup", "get_by_name").get(
            TABLE, {"project_id": project_id, "name": name, "deleted": False}
        )
        if row is None:
            raise exception.SecurityGroupNotFound(security_group_id=f"{project_id}/{name}")
        return cls._from_db_object(context, cls(), row)

    @remotable
    async def create(self) -> None:
        if self.obj_attr_is_set("id"):
            raise exception.ObjectAlreadyCreated(objname="SecurityGroup")
        if not self.obj_attr_is_set("uuid"):
            self.uuid = str(uuidlib.uuid4())
        self.obj_set_defaults("deleted")
        values = self.obj_get_changes()
        values["created_at"] = utcnow()
        row = await get_db(self._context, "SecurityGroup", "create").insert(TABLE, values)
        self._from_db_object(self._context, self, row)

    @remotable(send_changes_only=True)
    async def save(self) -> None:
        values = self.obj_get_changes()
        if not values:
            return
        values["updated_at"] = utcnow()
        rows = await get_db(self._context, "SecurityGroup", "save").update(
            TABLE, {"id": self.id}, values, returning=["updated_at"], standalone=True
        )
        if not rows:
            raise exception.SecurityGroupNotFound(security_group_id=self.id)
        self.updated_at = rows[0]["updated_at"]
        self.obj_reset_changes()

    @remotable(send_changes_only=True)
    async def destroy(self) -> None:
        now = utcnow()
        rows = await get_db(self._context, "SecurityGroup", "destroy").update(
            TABLE,
            {"id": self.id, "deleted": False},
            {"deleted": True, "deleted_at": now},
            returning=["deleted_at"],
        )
        if not rows:
            raise exception.SecurityGroupNotFound(security_group_id=self.id)
        self.deleted = True
        self.deleted_at = rows[0]["deleted_at"]
        self.obj_reset_changes()


@FleetObjectRegistry.register
class SecurityGroupList(ObjectListBase[SecurityGroup], FleetObject):
    # Version 1.0: Initial version
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    objects: Any

    fields = {
        "objects": fields.ListOfObjectsField("SecurityGroup"),
    }

    @classmethod
    @remotable
    async def get_by_project(cls, context: Any, project_id: str) -> SecurityGroupList:
        rows = await get_db(context, "SecurityGroupList", "get_by_project").select(
            TABLE, {"project_id": project_id, "deleted": False}
        )
        result = cls(
            context,
            objects=[SecurityGroup._from_db_object(context, SecurityGroup(), r) for r in rows],
        )
        result.obj_reset_changes()
        return result

    @classmethod
    @remotable
    async def get_by_instance(cls, context: Any, instance_uuid: str) -> SecurityGroupList:
        db = get_db(context, "SecurityGroupList", "get_by_instance")
        links = await db.select(
            "security_group_instance_association",
            {"instance_uuid": instance_uuid, "deleted": False},
            columns=["security_group_id"],
        )
        rows: list[dict[str, Any]] = []
        if links:
            rows = await db.select(
                TABLE, {"id": [link["security_group_id"] for link in links], "deleted": False}
            )
        result = cls(
            context,
            objects=[SecurityGroup._from_db_object(context, SecurityGroup(), r) for r in rows],
        )
        result.obj_reset_changes()
        return result
