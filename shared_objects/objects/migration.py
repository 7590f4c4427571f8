"""Migration: moving an instance between hosts, with its status and memory-copy progress."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

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
    drop_added_fields,
    from_row,
    insert_row,
    list_from_rows,
    save_changes,
)

TABLE = "migrations"


@FleetObjectRegistry.register
class Migration(FleetPersistentObject, FleetObject):
    """A (live) migration: accepted → preparing → running → post-migrating → completed."""

    # Version 1.0: Initial version
    # Version 1.1: Added disk_total, disk_processed, disk_remaining
    VERSION = "1.1"

    # Typed views of the fields below (oslo makes them properties at registration).
    id: int
    uuid: str
    instance_uuid: str
    source_compute: str | None
    dest_compute: str | None
    source_node: str | None
    dest_node: str | None
    status: str
    migration_type: str
    memory_total: int | None
    memory_processed: int | None
    memory_remaining: int | None
    disk_total: int | None
    disk_processed: int | None
    disk_remaining: int | None

    obj_identity_fields: ClassVar[tuple[str, ...]] = ("id", "uuid")

    fields = {
        "id": fields.IntegerField(),
        "uuid": fields.UUIDField(),
        "instance_uuid": fields.UUIDField(),
        "source_compute": fields.StringField(nullable=True),
        "dest_compute": fields.StringField(nullable=True),
        "source_node": fields.StringField(nullable=True),
        "dest_node": fields.StringField(nullable=True),
        "status": fields.MigrationStatusField(),
        "migration_type": fields.MigrationTypeField(),
        "memory_total": fields.NonNegativeIntegerField(nullable=True),
        "memory_processed": fields.NonNegativeIntegerField(nullable=True),
        "memory_remaining": fields.NonNegativeIntegerField(nullable=True),
        "disk_total": fields.NonNegativeIntegerField(nullable=True),
        "disk_processed": fields.NonNegativeIntegerField(nullable=True),
        "disk_remaining": fields.NonNegativeIntegerField(nullable=True),
    }

    def obj_make_compatible(self, primitive: dict[str, Any], target_version: str) -> None:
        super().obj_make_compatible(primitive, target_version)
        drop_added_fields(
            primitive, target_version, {(1, 1): ("disk_total", "disk_processed", "disk_remaining")}
        )

    @staticmethod
    def _from_db_object(context: Any, migration: Migration, row: Mapping[str, Any]) -> Migration:
        return from_row(context, migration, row)

    @property
    def is_finished(self) -> bool:
        return self.status in fields.MigrationStatus.FINISHED

    @classmethod
    @remotable
    async def get_by_id(cls, context: Any, migration_id: int) -> Migration:
        row = await get_db(context, "Migration", "get_by_id").get(
            TABLE, {"id": migration_id, "deleted": False}
        )
        if row is None:
            raise exception.MigrationNotFound(migration_id=migration_id)
        return cls._from_db_object(context, cls(), row)

    @classmethod
    @remotable
    async def get_by_uuid(cls, context: Any, migration_uuid: str) -> Migration:
        row = await get_db(context, "Migration", "get_by_uuid").get(
            TABLE, {"uuid": migration_uuid, "deleted": False}
        )
        if row is None:
            raise exception.MigrationNotFound(migration_id=migration_uuid)
        return cls._from_db_object(context, cls(), row)

    @remotable
    async def create(self) -> None:
        await insert_row(self, TABLE, defaults=("deleted",), new_uuid=True)

    @remotable(send_changes_only=True)
    async def save(self) -> None:
        await save_changes(self, TABLE, lambda: exception.MigrationNotFound(migration_id=self.id))


@FleetObjectRegistry.register
class MigrationList(ObjectListBase[Migration], FleetObject):
    # Version 1.0: Initial version
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    objects: Any

    fields = {
        "objects": fields.ListOfObjectsField("Migration"),
    }

    @classmethod
    @remotable
    async def get_by_instance(cls, context: Any, instance_uuid: str) -> MigrationList:
        rows = await get_db(context, "MigrationList", "get_by_instance").select(
            TABLE, {"instance_uuid": instance_uuid, "deleted": False}
        )
        return list_from_rows(cls, context, rows, Migration)

    @classmethod
    @remotable
    async def get_in_progress_by_host(cls, context: Any, host: str) -> MigrationList:
        """Unfinished migrations with ``host`` as source or destination (two indexed lookups)."""
        db = get_db(context, "MigrationList", "get_in_progress_by_host")
        active = [s for s in fields.MigrationStatus.ALL if s not in fields.MigrationStatus.FINISHED]
        rows = await db.select(TABLE, {"source_compute": host, "status": active, "deleted": False})
        seen = {r["id"] for r in rows}
        for row in await db.select(
            TABLE, {"dest_compute": host, "status": active, "deleted": False}
        ):
            if row["id"] not in seen:
                rows.append(row)
        rows.sort(key=lambda r: r["id"])
        return list_from_rows(cls, context, rows, Migration)
