"""InstanceAction: a user-visible record of one operation (create, live-migrate, ...) on an
instance, keyed by the request that started it."""

from __future__ import annotations

import datetime
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
    copy_row,
    from_row,
    list_from_rows,
    utcnow,
)

TABLE = "instance_actions"


@FleetObjectRegistry.register
class InstanceAction(FleetPersistentObject, FleetObject):
    # Version 1.0: Initial version
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    id: int
    action: str
    instance_uuid: str
    request_id: str
    user_id: str | None
    project_id: str | None
    start_time: datetime.datetime | None
    finish_time: datetime.datetime | None
    message: str | None

    fields = {
        "id": fields.IntegerField(),
        "action": fields.StringField(),
        "instance_uuid": fields.UUIDField(),
        "request_id": fields.StringField(),
        "user_id": fields.StringField(nullable=True),
        "project_id": fields.StringField(nullable=True),
        "start_time": fields.DateTimeField(nullable=True),
        "finish_time": fields.DateTimeField(nullable=True),
        "message": fields.StringField(nullable=True),
    }

    @staticmethod
    def _from_db_object(
        context: Any, action: InstanceAction, row: Mapping[str, Any]
    ) -> InstanceAction:
        return from_row(context, action, row)

    @classmethod
    @remotable
    async def get_by_request_id(
        cls, context: Any, instance_uuid: str, request_id: str
    ) -> InstanceAction:
        rows = await get_db(context, "InstanceAction", "get_by_request_id").select(
            TABLE,
            {"instance_uuid": instance_uuid, "request_id": request_id, "deleted": False},
            descending=True,
            limit=1,
        )
        if not rows:
            raise exception.InstanceActionNotFound(
                request_id=request_id, instance_uuid=instance_uuid
            )
        return cls._from_db_object(context, cls(), rows[0])

    @classmethod
    @remotable
    async def action_start(
        cls, context: Any, instance_uuid: str, action: str, message: str | None = None
    ) -> InstanceAction:
        """Record that the context's request started ``action`` on the instance."""
        now = utcnow()
        row = await get_db(context, "InstanceAction", "action_start").insert(
            TABLE,
            {
                "action": action,
                "instance_uuid": instance_uuid,
                "request_id": context.request_id,
                "user_id": context.user_id,
                "project_id": context.project_id,
                "start_time": now,
                "message": message,
                "created_at": now,
                "deleted": False,
            },
        )
        return cls._from_db_object(context, cls(), row)

    @classmethod
    @remotable
    async def action_finish(
        cls, context: Any, instance_uuid: str, message: str | None = None
    ) -> InstanceAction:
        """Record that the context's request finished its action on the instance."""
        action = await cls.get_by_request_id(context, instance_uuid, context.request_id)
        await action.finish(message)
        return action

    @remotable(send_changes_only=True)
    async def finish(self, message: str | None = None) -> None:
        now = utcnow()
        values: dict[str, Any] = {"finish_time": now, "updated_at": now}
        if message is not None:
            values["message"] = message
        rows = await get_db(self._context, "InstanceAction", "finish").update(
            TABLE, {"id": self.id}, values, returning=["finish_time", "updated_at", "message"]
        )
        if not rows:
            raise exception.InstanceActionNotFound(request_id="?", instance_uuid="?")
        copy_row(self, rows[0])
        self.obj_reset_changes()


@FleetObjectRegistry.register
class InstanceActionList(ObjectListBase[InstanceAction], FleetObject):
    """The actions of one instance, oldest first (``fleetctl action list``)."""

    # Version 1.0: Initial version (release 1.2)
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    objects: Any

    fields = {
        "objects": fields.ListOfObjectsField("InstanceAction"),
    }

    @classmethod
    @remotable
    async def get_by_instance_uuid(cls, context: Any, instance_uuid: str) -> InstanceActionList:
        rows = await get_db(context, "InstanceActionList", "get_by_instance_uuid").select(
            TABLE, {"instance_uuid": instance_uuid, "deleted": False}
        )
        return list_from_rows(cls, context, rows, InstanceAction)
