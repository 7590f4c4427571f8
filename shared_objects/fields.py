"""Field types of Fleet objects: oslo.versionedobjects' fields plus Fleet's named enums.

Import fields from here, not from ``oslo_versionedobjects.fields``, so that every object module
reads the same way (``fields.StringField()``, ``fields.VMStateField()``). A named enum changes an
object's fingerprint when its values change, which is what forces a version bump.
"""

from __future__ import annotations

from typing import ClassVar

from oslo_versionedobjects import fields as _ovo_fields
from oslo_versionedobjects.fields import (
    BaseEnumField,
    BooleanField,
    DateTimeField,
    DictOfNullableStringsField,
    DictOfStringsField,
    Enum,
    EnumField,
    Field,
    FieldType,
    FlexibleBooleanField,
    FloatField,
    IntegerField,
    ListOfObjectsField,
    ListOfStringsField,
    NonNegativeFloatField,
    NonNegativeIntegerField,
    ObjectField,
    SensitiveStringField,
    StringField,
    UnspecifiedDefault,
    UUIDField,
)

__all__ = [
    "BDMDestinationType",
    "BDMDestinationTypeField",
    "BDMSourceType",
    "BDMSourceTypeField",
    "BaseEnumField",
    "BaseFleetEnum",
    "BooleanField",
    "DateTimeField",
    "DictOfNullableStringsField",
    "DictOfStringsField",
    "Enum",
    "EnumField",
    "Field",
    "FieldType",
    "FlexibleBooleanField",
    "FloatField",
    "IntegerField",
    "JSONDictField",
    "ListOfObjectsField",
    "ListOfStringsField",
    "MigrationStatus",
    "MigrationStatusField",
    "MigrationType",
    "MigrationTypeField",
    "NonNegativeFloatField",
    "NonNegativeIntegerField",
    "ObjectField",
    "PowerState",
    "PowerStateField",
    "SecurityGroupRuleProtocol",
    "SecurityGroupRuleProtocolField",
    "SensitiveStringField",
    "StringField",
    "TaskState",
    "TaskStateField",
    "UUIDField",
    "UnspecifiedDefault",
    "VMState",
    "VMStateField",
]

# Re-exported so callers never need oslo's module directly.
ovo_fields = _ovo_fields


class BaseFleetEnum(Enum):
    """A named string enum: subclasses list their values as constants and in ``ALL``."""

    ALL: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__(valid_values=self.__class__.ALL)


class VMState(BaseFleetEnum):
    """What the instance is, as the user sees it (Nova's ``vm_states``)."""

    BUILDING = "building"
    ACTIVE = "active"
    STOPPED = "stopped"
    PAUSED = "paused"
    SUSPENDED = "suspended"
    ERROR = "error"
    DELETED = "deleted"

    ALL = (BUILDING, ACTIVE, STOPPED, PAUSED, SUSPENDED, ERROR, DELETED)


class TaskState(BaseFleetEnum):
    """What is being done to the instance right now (``None`` when idle)."""

    SCHEDULING = "scheduling"
    BLOCK_DEVICE_MAPPING = "block_device_mapping"
    NETWORKING = "networking"
    SPAWNING = "spawning"
    POWERING_OFF = "powering-off"
    POWERING_ON = "powering-on"
    REBOOTING = "rebooting"
    MIGRATING = "migrating"
    DELETING = "deleting"

    ALL = (
        SCHEDULING,
        BLOCK_DEVICE_MAPPING,
        NETWORKING,
        SPAWNING,
        POWERING_OFF,
        POWERING_ON,
        REBOOTING,
        MIGRATING,
        DELETING,
    )


class PowerState(BaseFleetEnum):
    """What the hypervisor reports. Nova stores integers; Fleet uses readable strings."""

    NOSTATE = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    CRASHED = "crashed"
    SUSPENDED = "suspended"

    ALL = (NOSTATE, RUNNING, PAUSED, SHUTDOWN, CRASHED, SUSPENDED)


class MigrationStatus(BaseFleetEnum):
    """Life of a migration: accepted → preparing → running → post-migrating → completed."""

    ACCEPTED = "accepted"
    QUEUED = "queued"
    PREPARING = "preparing"
    RUNNING = "running"
    POST_MIGRATING = "post-migrating"
    COMPLETED = "completed"
    FAILED = "failed"
    ERROR = "error"
    CANCELLED = "cancelled"

    ALL = (
        ACCEPTED,
        QUEUED,
        PREPARING,
        RUNNING,
        POST_MIGRATING,
        COMPLETED,
        FAILED,
        ERROR,
        CANCELLED,
    )
    # A migration in one of these states no longer holds resources anywhere.
    FINISHED = (COMPLETED, FAILED, ERROR, CANCELLED)


class MigrationType(BaseFleetEnum):
    MIGRATION = "migration"
    RESIZE = "resize"
    LIVE_MIGRATION = "live-migration"
    EVACUATION = "evacuation"

    ALL = (MIGRATION, RESIZE, LIVE_MIGRATION, EVACUATION)


class BDMSourceType(BaseFleetEnum):
    BLANK = "blank"
    IMAGE = "image"
    SNAPSHOT = "snapshot"
    VOLUME = "volume"

    ALL = (BLANK, IMAGE, SNAPSHOT, VOLUME)


class BDMDestinationType(BaseFleetEnum):
    LOCAL = "local"
    VOLUME = "volume"

    ALL = (LOCAL, VOLUME)


class SecurityGroupRuleProtocol(BaseFleetEnum):
    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"

    ALL = (TCP, UDP, ICMP)


class VMStateField(BaseEnumField):
    AUTO_TYPE = VMState()


class TaskStateField(BaseEnumField):
    AUTO_TYPE = TaskState()


class PowerStateField(BaseEnumField):
    AUTO_TYPE = PowerState()


class MigrationStatusField(BaseEnumField):
    AUTO_TYPE = MigrationStatus()


class MigrationTypeField(BaseEnumField):
    AUTO_TYPE = MigrationType()


class BDMSourceTypeField(BaseEnumField):
    AUTO_TYPE = BDMSourceType()


class BDMDestinationTypeField(BaseEnumField):
    AUTO_TYPE = BDMDestinationType()


class SecurityGroupRuleProtocolField(BaseEnumField):
    AUTO_TYPE = SecurityGroupRuleProtocol()


class JSONDict(_ovo_fields.FieldType):
    """A mapping of JSON values with string keys (a hypervisor driver's own migration data).

    The driver on both ends is the same kind, so its private data needs no versioning of its
    own; the object carrying it does.
    """

    @staticmethod
    def coerce(obj: object, attr: str, value: object) -> dict[str, object]:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"{attr} must be a mapping with string keys")
        return dict(value)


class JSONDictField(_ovo_fields.AutoTypedField):
    AUTO_TYPE = JSONDict()
