"""SecurityGroup: a named set of firewall rules that instances belong to."""

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
        return from_row(context, group, row)

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
        await insert_row(self, TABLE, defaults=("deleted",), new_uuid=True)

    @remotable(send_changes_only=True)
    async def save(self) -> None:
        await save_changes(
            self, TABLE, lambda: exception.SecurityGroupNotFound(security_group_id=self.id)
        )

    @remotable(send_changes_only=True)
    async def destroy(self) -> None:
        await soft_delete(
            self, TABLE, lambda: exception.SecurityGroupNotFound(security_group_id=self.id)
        )


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
        return list_from_rows(cls, context, rows, SecurityGroup)

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
        return list_from_rows(cls, context, rows, SecurityGroup)
