"""Flavor: a named bundle of resources (vCPUs, RAM, disk) an instance is built from."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from shared_objects import exception, fields
from shared_objects.base import (
    FleetObject,
    FleetObjectRegistry,
    ObjectListBase,
    get_db,
    remotable,
)
from shared_objects.objects._common import (
    copy_row,
    from_row,
    list_from_rows,
    save_changes,
    utcnow,
)

TABLE = "flavors"


@FleetObjectRegistry.register
class Flavor(FleetObject):
    """A flavor. Instances keep a copy of theirs (``Instance.flavor``), so later edits of the
    flavor never change what a running instance was given."""

    # Version 1.0: Initial version
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    id: int
    flavorid: str
    name: str
    vcpus: int
    memory_mb: int
    root_gb: int
    ephemeral_gb: int
    swap: int
    is_public: bool
    disabled: bool
    extra_specs: dict[str, str]
    created_at: datetime.datetime | None
    updated_at: datetime.datetime | None

    fields = {
        "id": fields.IntegerField(),
        "flavorid": fields.StringField(),
        "name": fields.StringField(),
        "vcpus": fields.NonNegativeIntegerField(),
        "memory_mb": fields.NonNegativeIntegerField(),
        "root_gb": fields.NonNegativeIntegerField(),
        "ephemeral_gb": fields.NonNegativeIntegerField(default=0),
        "swap": fields.NonNegativeIntegerField(default=0),
        "is_public": fields.BooleanField(default=True),
        "disabled": fields.BooleanField(default=False),
        "extra_specs": fields.DictOfStringsField(default={}),
        "created_at": fields.DateTimeField(nullable=True),
        "updated_at": fields.DateTimeField(nullable=True),
    }

    @staticmethod
    def _from_db_object(context: Any, flavor: Flavor, row: Mapping[str, Any]) -> Flavor:
        return from_row(context, flavor, row)

    def to_embedded(self) -> dict[str, Any]:
        """The copy stored with an instance (plain JSON values, no timestamps)."""
        out: dict[str, Any] = {}
        for name in self.fields:
            if name in ("created_at", "updated_at") or not self.obj_attr_is_set(name):
                continue
            out[name] = getattr(self, name)
        return out

    @classmethod
    def from_embedded(cls, context: Any, data: Mapping[str, Any]) -> Flavor:
        """Rebuild the copy stored with an instance."""
        flavor = cls(context)
        copy_row(flavor, data)
        flavor.obj_reset_changes()
        return flavor

    @classmethod
    @remotable
    async def get_by_id(cls, context: Any, flavor_id: int) -> Flavor:
        row = await get_db(context, "Flavor", "get_by_id").get(TABLE, {"id": flavor_id})
        if row is None:
            raise exception.FlavorNotFound(flavor_id=flavor_id)
        return cls._from_db_object(context, cls(), row)

    @classmethod
    @remotable
    async def get_by_flavor_id(cls, context: Any, flavorid: str) -> Flavor:
        row = await get_db(context, "Flavor", "get_by_flavor_id").get(TABLE, {"flavorid": flavorid})
        if row is None:
            raise exception.FlavorNotFound(flavor_id=flavorid)
        return cls._from_db_object(context, cls(), row)

    @classmethod
    @remotable
    async def get_by_name(cls, context: Any, name: str) -> Flavor:
        row = await get_db(context, "Flavor", "get_by_name").get(TABLE, {"name": name})
        if row is None:
            raise exception.FlavorNotFound(flavor_id=name)
        return cls._from_db_object(context, cls(), row)

    @remotable
    async def create(self) -> None:
        if self.obj_attr_is_set("id"):
            raise exception.ObjectAlreadyCreated(objname="Flavor")
        db = get_db(self._context, "Flavor", "create")
        self.obj_set_defaults()
        values = self.obj_get_changes()
        values.setdefault("flavorid", values.get("name"))
        values["created_at"] = utcnow()
        if await db.get(TABLE, {"flavorid": values["flavorid"]}) is not None:
            raise exception.ObjectAlreadyExists(objname="Flavor", key=values["flavorid"])
        row = await db.insert(TABLE, values)
        self._from_db_object(self._context, self, row)

    @remotable(send_changes_only=True)
    async def save(self) -> None:
        await save_changes(self, TABLE, lambda: exception.FlavorNotFound(flavor_id=self.id))

    @remotable(send_changes_only=True)
    async def destroy(self) -> None:
        count = await get_db(self._context, "Flavor", "destroy").delete(TABLE, {"id": self.id})
        if not count:
            raise exception.FlavorNotFound(flavor_id=self.id)


@FleetObjectRegistry.register
class FlavorList(ObjectListBase[Flavor], FleetObject):
    # Version 1.0: Initial version
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    objects: Any

    fields = {
        "objects": fields.ListOfObjectsField("Flavor"),
    }

    @classmethod
    @remotable
    async def get_all(cls, context: Any) -> FlavorList:
        rows = await get_db(context, "FlavorList", "get_all").select(TABLE, {})
        return list_from_rows(cls, context, rows, Flavor)
