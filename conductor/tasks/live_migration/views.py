"""Live migrations as operators see them (``fleetctl migration show/list``): JSON-able dicts."""

from __future__ import annotations

from typing import Any

from conductor.db.session import Database
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.objects.instance import Instance
from shared_objects.objects.migration import Migration, MigrationList

MIGRATION_FIELDS = (
    "uuid",
    "instance_uuid",
    "source_compute",
    "dest_compute",
    "source_node",
    "dest_node",
    "status",
    "migration_type",
    "memory_total",
    "memory_processed",
    "memory_remaining",
    "disk_total",
    "disk_processed",
    "disk_remaining",
)


def migration_to_dict(migration: Migration, progress: int | None = None) -> dict[str, Any]:
    """A Migration as the CLI shows it (JSON-able)."""
    out: dict[str, Any] = {
        name: getattr(migration, name) if migration.obj_attr_is_set(name) else None
        for name in MIGRATION_FIELDS
    }
    for stamp in ("created_at", "updated_at"):
        value = getattr(migration, stamp, None) if migration.obj_attr_is_set(stamp) else None
        out[stamp] = value.isoformat() if value is not None else None
    out["progress"] = progress
    return out


async def read_migration(
    database: Database, ctxt: RequestContext, migration_uuid: str
) -> dict[str, Any]:
    """The Migration (status, progress bytes) plus the instance's progress percentage."""
    async with database.request(ctxt):
        migration = await Migration.get_by_uuid(ctxt, migration_uuid)
        progress: int | None = None
        try:
            progress = (await Instance.get_by_uuid(ctxt, migration.instance_uuid)).progress
        except exception.InstanceNotFound:
            progress = None
    return migration_to_dict(migration, progress)


async def read_migrations(
    database: Database, ctxt: RequestContext, instance_uuid: str | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    """Migrations, newest first (of one instance when given)."""
    async with database.request(ctxt):
        if instance_uuid is not None:
            found = list(await MigrationList.get_by_instance(ctxt, instance_uuid))
        else:
            db = ctxt.db
            assert db is not None
            rows = await db.select("migrations", {"deleted": False})
            found = [Migration._from_db_object(ctxt, Migration(), r) for r in rows]
    found.sort(key=lambda m: m.id, reverse=True)
    return [migration_to_dict(m) for m in found[: max(1, int(limit))]]
