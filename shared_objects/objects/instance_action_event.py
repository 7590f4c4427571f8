"""InstanceActionEvent: one step (e.g. ``compute_live_migration``) of an InstanceAction, with
its result and, on failure, the traceback."""

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
    from_row,
    list_from_rows,
    utcnow,
)
from shared_objects.objects.instance_action import TABLE as ACTIONS_TABLE

TABLE = "instance_action_events"

RESULT_SUCCESS = "Success"
RESULT_ERROR = "Error"


@FleetObjectRegistry.register
class InstanceActionEvent(FleetPersistentObject, FleetObject):
    # Version 1.0: Initial version
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    id: int
    action_id: int
    event: str
    start_time: datetime.datetime | None
    finish_time: datetime.datetime | None
    result: str | None
    traceback: str | None
    host: str | None
    details: str | None

    fields = {
        "id": fields.IntegerField(),
        "action_id": fields.IntegerField(),
        "event": fields.StringField(),
        "start_time": fields.DateTimeField(nullable=True),
        "finish_time": fields.DateTimeField(nullable=True),
        "result": fields.StringField(nullable=True),
        "traceback": fields.StringField(nullable=True),
        "host": fields.StringField(nullable=True),
        "details": fields.StringField(nullable=True),
    }

    @staticmethod
    def _from_db_object(
        context: Any, event: InstanceActionEvent, row: Mapping[str, Any]
    ) -> InstanceActionEvent:
        return from_row(context, event, row)

    @staticmethod
    async def _action_id(context: Any, method: str, instance_uuid: str) -> int:
        rows = await get_db(context, "InstanceActionEvent", method).select(
            ACTIONS_TABLE,
            {"instance_uuid": instance_uuid, "request_id": context.request_id, "deleted": False},
            columns=["id"],
            descending=True,
            limit=1,
        )
        if not rows:
            raise exception.InstanceActionNotFound(
                request_id=context.request_id, instance_uuid=instance_uuid
            )
        return int(rows[0]["id"])

    @classmethod
    @remotable
    async def event_start(
        cls, context: Any, instance_uuid: str, event_name: str, host: str | None = None
    ) -> InstanceActionEvent:
        """Start ``event_name`` under the action of the context's request."""
        action_id = await cls._action_id(context, "event_start", instance_uuid)
        return await cls.start_under(context, action_id, event_name, host)

    @classmethod
    async def start_under(
        cls, context: Any, action_id: int, event_name: str, host: str | None = None
    ) -> InstanceActionEvent:
        """Start ``event_name`` under a known action (database side only, not remotable): for
        the conductor, which has just created the action and need not look it up again."""
        now = utcnow()
        row = await get_db(context, "InstanceActionEvent", "event_start").insert(
            TABLE,
            {
                "action_id": action_id,
                "event": event_name,
                "start_time": now,
                "host": host,
                "created_at": now,
                "deleted": False,
            },
        )
        return cls._from_db_object(context, cls(), row)

    @classmethod
    @remotable
    async def event_finish(
        cls,
        context: Any,
        instance_uuid: str,
        event_name: str,
        result: str = RESULT_SUCCESS,
        traceback: str | None = None,
        details: str | None = None,
    ) -> InstanceActionEvent:
        """Finish the latest ``event_name`` of the request's action with ``result``."""
        action_id = await cls._action_id(context, "event_finish", instance_uuid)
        db = get_db(context, "InstanceActionEvent", "event_finish")
        rows = await db.select(
            TABLE,
            {"action_id": action_id, "event": event_name, "deleted": False},
            columns=["id"],
            descending=True,
            limit=1,
        )
        if not rows:
            raise exception.InstanceActionNotFound(
                request_id=context.request_id, instance_uuid=instance_uuid
            )
        now = utcnow()
        updated = await db.update(
            TABLE,
            {"id": rows[0]["id"]},
            {
                "finish_time": now,
                "result": result,
                "traceback": traceback,
                "details": details,
                "updated_at": now,
            },
            returning=None,
        )
        return cls._from_db_object(context, cls(), updated[0])


@FleetObjectRegistry.register
class InstanceActionEventList(ObjectListBase[InstanceActionEvent], FleetObject):
    """The events (steps) of one action, oldest first (``fleetctl action show``)."""

    # Version 1.0: Initial version (release 1.2)
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    objects: Any

    fields = {
        "objects": fields.ListOfObjectsField("InstanceActionEvent"),
    }

    @classmethod
    @remotable
    async def get_by_action_id(cls, context: Any, action_id: int) -> InstanceActionEventList:
        rows = await get_db(context, "InstanceActionEventList", "get_by_action_id").select(
            TABLE, {"action_id": action_id, "deleted": False}
        )
        return list_from_rows(cls, context, rows, InstanceActionEvent)
