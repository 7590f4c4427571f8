"""LiveMigrateData: what source and destination agents tell each other during a live migration.

Not stored: it travels in compute RPC calls (check_can_live_migrate_* → live_migration →
post/rollback), so it has no remotable methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from shared_objects import fields
from shared_objects.base import FleetObject, FleetObjectRegistry
from shared_objects.objects._common import drop_added_fields

if TYPE_CHECKING:
    from shared_objects.objects.migration import Migration


@FleetObjectRegistry.register
class LiveMigrateData(FleetObject):
    # Version 1.0: Initial version
    # Version 1.1: Added bandwidth_limit_mb_s
    VERSION = "1.1"

    # Typed views of the fields below (oslo makes them properties at registration).
    block_migration: bool | None
    disk_over_commit: bool | None
    is_shared_block_storage: bool | None
    is_shared_instance_path: bool | None
    migration: Migration
    source_host: str | None
    dest_host: str | None
    dest_node: str | None
    max_downtime_ms: int | None
    force_complete: bool
    driver_data: dict[str, Any]
    bandwidth_limit_mb_s: int | None

    fields = {
        "block_migration": fields.BooleanField(nullable=True),
        "disk_over_commit": fields.BooleanField(nullable=True),
        "is_shared_block_storage": fields.BooleanField(nullable=True),
        "is_shared_instance_path": fields.BooleanField(nullable=True),
        "migration": fields.ObjectField("Migration"),
        "source_host": fields.StringField(nullable=True),
        "dest_host": fields.StringField(nullable=True),
        "dest_node": fields.StringField(nullable=True),
        "max_downtime_ms": fields.NonNegativeIntegerField(nullable=True),
        "force_complete": fields.BooleanField(default=False),
        "driver_data": fields.JSONDictField(default={}),
        "bandwidth_limit_mb_s": fields.NonNegativeIntegerField(nullable=True),
    }

    def obj_make_compatible(self, primitive: dict[str, Any], target_version: str) -> None:
        super().obj_make_compatible(primitive, target_version)
        drop_added_fields(primitive, target_version, {(1, 1): ("bandwidth_limit_mb_s",)})

    # Keys of a driver's migrate-data dict that are fields of their own here.
    _PROMOTED = ("source_host", "dest_host", "dest_node", "bandwidth_limit_mb_s")

    @classmethod
    def from_driver_data(cls, data: Mapping[str, Any]) -> LiveMigrateData:
        """Wrap a driver's migrate-data dict for the wire (hosts become typed fields)."""
        lmd = cls(driver_data={k: v for k, v in data.items() if k not in cls._PROMOTED})
        for key in cls._PROMOTED:
            if key in data:
                setattr(lmd, key, data[key])
        return lmd

    def to_driver_data(self) -> dict[str, Any]:
        """The dict the driver works with (the inverse of ``from_driver_data``)."""
        out = dict(self.driver_data) if self.obj_attr_is_set("driver_data") else {}
        for key in self._PROMOTED:
            if self.obj_attr_is_set(key):
                out[key] = getattr(self, key)
        return out
