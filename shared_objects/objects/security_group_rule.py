"""SecurityGroupRule: one firewall rule (protocol, port range, source CIDR or group)."""

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
    soft_delete,
)

TABLE = "security_group_rules"


@FleetObjectRegistry.register
class SecurityGroupRule(FleetPersistentObject, FleetObject):
    # Version 1.0: Initial version
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    id: int
    parent_group_id: int
    protocol: str | None
    from_port: int | None
    to_port: int | None
    cidr: str | None
    grantee_group_id: int | None

    fields = {
        "id": fields.IntegerField(),
        "parent_group_id": fields.IntegerField(),
        "protocol": fields.SecurityGroupRuleProtocolField(nullable=True),
        "from_port": fields.IntegerField(nullable=True),
        "to_port": fields.IntegerField(nullable=True),
        "cidr": fields.StringField(nullable=True),
        "grantee_group_id": fields.IntegerField(nullable=True),
    }

    @staticmethod
    def _from_db_object(
        context: Any, rule: SecurityGroupRule, row: Mapping[str, Any]
    ) -> SecurityGroupRule:
        return from_row(context, rule, row)

    @classmethod
    @remotable
    async def get_by_id(cls, context: Any, rule_id: int) -> SecurityGroupRule:
        row = await get_db(context, "SecurityGroupRule", "get_by_id").get(
            TABLE, {"id": rule_id, "deleted": False}
        )
        if row is None:
            raise exception.SecurityGroupRuleNotFound(rule_id=rule_id)
        return cls._from_db_object(context, cls(), row)

    @remotable
    async def create(self) -> None:
        await insert_row(self, TABLE, defaults=("deleted",))

    @remotable(send_changes_only=True)
    async def destroy(self) -> None:
        await soft_delete(self, TABLE, lambda: exception.SecurityGroupRuleNotFound(rule_id=self.id))


@FleetObjectRegistry.register
class SecurityGroupRuleList(ObjectListBase[SecurityGroupRule], FleetObject):
    # Version 1.0: Initial version
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    objects: Any

    fields = {
        "objects": fields.ListOfObjectsField("SecurityGroupRule"),
    }

    @classmethod
    @remotable
    async def get_by_security_group_ids(
        cls, context: Any, security_group_ids: list[int]
    ) -> SecurityGroupRuleList:
        """Rules of several groups in one query (e.g. every group of one instance)."""
        rows = await get_db(context, "SecurityGroupRuleList", "get_by_security_group_ids").select(
            TABLE, {"parent_group_id": list(security_group_ids), "deleted": False}
        )
        return list_from_rows(cls, context, rows, SecurityGroupRule)

    @classmethod
    @remotable
    async def get_by_instance(cls, context: Any, instance_uuid: str) -> SecurityGroupRuleList:
        """Every rule that applies to an instance (through its groups), in two queries."""
        db = get_db(context, "SecurityGroupRuleList", "get_by_instance")
        links = await db.select(
            "security_group_instance_association",
            {"instance_uuid": instance_uuid, "deleted": False},
            columns=["security_group_id"],
        )
        rows: list[dict[str, Any]] = []
        if links:
            rows = await db.select(
                TABLE,
                {
                    "parent_group_id": [link["security_group_id"] for link in links],
                    "deleted": False,
                },
            )
        return list_from_rows(cls, context, rows, SecurityGroupRule)
