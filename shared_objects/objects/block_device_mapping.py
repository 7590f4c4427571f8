"""BlockDeviceMapping: a disk or volume attached to an instance."""

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

TABLE = "block_device_mappings"


@FleetObjectRegistry.register
class BlockDeviceMapping(FleetPersistentObject, FleetObject):
    # Version 1.0: Initial version
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    id: int
    uuid: str
    instance_uuid: str
    source_type: str | None
    destination_type: str | None
    device_name: str | None
    boot_index: int | None
    delete_on_termination: bool
    volume_id: str | None
    volume_size: int | None
    image_id: str | None
    snapshot_id: str | None
    disk_bus: str | None
    device_type: str | None
    guest_format: str | None
    connection_info: str | None
    attachment_id: str | None
    tag: str | None

    fields = {
        "id": fields.IntegerField(),
        "uuid": fields.UUIDField(),
        "instance_uuid": fields.UUIDField(),
        "source_type": fields.BDMSourceTypeField(nullable=True),
        "destination_type": fields.BDMDestinationTypeField(nullable=True),
        "device_name": fields.StringField(nullable=True),
        "boot_index": fields.IntegerField(nullable=True),
        "delete_on_termination": fields.BooleanField(default=False),
        "volume_id": fields.StringField(nullable=True),
        "volume_size": fields.IntegerField(nullable=True),
        "image_id": fields.StringField(nullable=True),
        "snapshot_id": fields.StringField(nullable=True),
        "disk_bus": fields.StringField(nullable=True),
        "device_type": fields.StringField(nullable=True),
        "guest_format": fields.StringField(nullable=True),
        "connection_info": fields.SensitiveStringField(nullable=True),
        "attachment_id": fields.UUIDField(nullable=True),
        "tag": fields.StringField(nullable=True),
    }

    @staticmethod
    def _from_db_object(
        context: Any, bdm: BlockDeviceMapping, row: Mapping[str, Any]
    ) -> BlockDeviceMapping:
        copy_row(bdm, row)
        bdm._context = context
        bdm.obj_reset_changes()
        return bdm

    @property
    def is_volume(self) -> bool:
        return self.destination_type == fields.BDMDestinationType.VOLUME

    @classmethod
    @remotable
    async def get_by_volume_and_instance(
        cls, context: Any, volume_id: str, instance_uuid: str
    ) -> BlockDeviceMapping:
        row = await get_db(context, "BlockDeviceMapping", "get_by_volume_and_instance").get(
            TABLE, {"volume_id": volume_id, "instance_uuid": instance_uuid, "deleted": False}
        )
        if row is None:
            raise exception.BlockDeviceMappingNotFound(bdm_id=f"{volume_id}@{instance_uuid}")
        return cls._from_db_object(context, cls(), row)

    @remotable
    async def create(self) -> None:
        if self.obj_attr_is_set("id"):
            raise exception.ObjectAlreadyCreated(objname="BlockDeviceMapping")
        if not self.obj_attr_is_set("uuid"):
            self.uuid = str(uuidlib.uuid4())
        self.obj_set_defaults("deleted", "delete_on_termination")
        values = self.obj_get_changes()
        values["created_at"] = utcnow()
        row = await get_db(self._context, "BlockDeviceMapping", "create").insert(TABLE, values)
        self._from_db_object(self._context, self, row)

    @remotable(send_changes_only=True)
    async def save(self) -> None:
        values = self.obj_get_changes()
        if not values:
            return
        values["updated_at"] = utcnow()
        rows = await get_db(self._context, "BlockDeviceMapping", "save").update(
            TABLE, {"id": self.id}, values, returning=["updated_at"], standalone=True
        )
        if not rows:
            raise exception.BlockDeviceMappingNotFound(bdm_id=self.id)
        self.updated_at = rows[0]["updated_at"]
        self.obj_reset_changes()

    @remotable(send_changes_only=True)
    async def destroy(self) -> None:
        now = utcnow()
        rows = await get_db(self._context, "BlockDeviceMapping", "destroy").update(
            TABLE,
            {"id": self.id, "deleted": False},
            {"deleted": True, "deleted_at": now},
            returning=["deleted_at"],
        )
        if not rows:
            raise exception.BlockDeviceMappingNotFound(bdm_id=self.id)
        self.deleted = True
        self.deleted_at = rows[0]["deleted_at"]
        self.obj_reset_changes()


@FleetObjectRegistry.register
class BlockDeviceMappingList(ObjectListBase[BlockDeviceMapping], FleetObject):
    # Version 1.0: Initial version
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    objects: Any

    fields = {
        "objects": fields.ListOfObjectsField("BlockDeviceMapping"),
    }

    @classmethod
    @remotable
    async def get_by_instance_uuid(cls, context: Any, instance_uuid: str) -> BlockDeviceMappingList:
        rows = await get_db(context, "BlockDeviceMappingList", "get_by_instance_uuid").select(
            TABLE, {"instance_uuid": instance_uuid, "deleted": False}
        )
        result = cls(
            context,
            objects=[
                BlockDeviceMapping._from_db_object(context, BlockDeviceMapping(), r) for r in rows
            ],
        )
        result.obj_reset_changes()
        return result
