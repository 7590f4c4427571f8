"""InstanceFault: the last error that hit an instance (code, message, details, host)."""

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
)

TABLE = "instance_faults"


@FleetObjectRegistry.register
class InstanceFault(FleetPersistentObject, FleetObject):
    # Version 1.0: Initial version
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    id: int
    instance_uuid: str
    code: int
    message: str | None
    details: str | None
    host: str | None

    fields = {
        "id": fields.IntegerField(),
        "instance_uuid": fields.UUIDField(),
        "code": fields.IntegerField(),
        "message": fields.StringField(nullable=True),
        "details": fields.StringField(nullable=True),
        "host": fields.StringField(nullable=True),
    }

    @staticmethod
    def _from_db_object(
        context: Any, fault: InstanceFault, row: Mapping[str, Any]
    ) -> InstanceFault:
        return from_row(context, fault, row)

    @classmethod
    @remotable
    async def get_latest_for_instance(cls, context: Any, instance_uuid: str) -> InstanceFault:
        rows = await get_db(context, "InstanceFault", "get_latest_for_instance").select(
            TABLE, {"instance_uuid": instance_uuid, "deleted": False}, descending=True, limit=1
        )
        if not rows:
            raise exception.InstanceFaultNotFound(instance_uuid=instance_uuid)
        return cls._from_db_object(context, cls(), rows[0])

    @remotable
    async def create(self) -> None:
        await insert_row(self, TABLE, defaults=("deleted",))


@FleetObjectRegistry.register
class InstanceFaultList(ObjectListBase[InstanceFault], FleetObject):
    """Every fault recorded for one instance, oldest first (``fleetctl action show``)."""

    # Version 1.0: Initial version (release 1.2)
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    objects: Any

    fields = {
        "objects": fields.ListOfObjectsField("InstanceFault"),
    }

    @classmethod
    @remotable
    async def get_by_instance_uuid(cls, context: Any, instance_uuid: str) -> InstanceFaultList:
        rows = await get_db(context, "InstanceFaultList", "get_by_instance_uuid").select(
            TABLE, {"instance_uuid": instance_uuid, "deleted": False}
        )
        return list_from_rows(cls, context, rows, InstanceFault)
