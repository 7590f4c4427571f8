"""BlockDeviceMapping: a disk or volume attached to an instance."""

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
        return from_row(context, bdm, row)

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
        await insert_row(self, TABLE, defaults=("deleted", "delete_on_termination"), new_uuid=True)

    @remotable(send_changes_only=True)
    async def save(self) -> None:
        await save_changes(
            self, TABLE, lambda: exception.BlockDeviceMappingNotFound(bdm_id=self.id)
        )

    @remotable(send_changes_only=True)
    async def destroy(self) -> None:
        await soft_delete(self, TABLE, lambda: exception.BlockDeviceMappingNotFound(bdm_id=self.id))


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
        return list_from_rows(cls, context, rows, BlockDeviceMapping)
