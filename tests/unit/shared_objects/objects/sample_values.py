"""Sample field values for building fully populated objects in tests."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

from oslo_versionedobjects import fields as ovo_fields

from shared_objects import fields
from shared_objects.base import FleetObject, FleetObjectRegistry

NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def sample_value(field: ovo_fields.Field[Any]) -> Any:
    kind = field._type
    if isinstance(kind, ovo_fields.Object):
        return populated(kind._obj_name)
    if isinstance(kind, ovo_fields.List) and isinstance(
        kind._element_type._type, ovo_fields.Object
    ):
        return [populated(kind._element_type._type._obj_name)]
    if isinstance(kind, ovo_fields.Enum):
        return sorted(kind.valid_values)[0]
    if isinstance(kind, ovo_fields.UUID):
        return str(uuid.uuid4())
    if isinstance(kind, (ovo_fields.Integer, ovo_fields.NonNegativeInteger)):
        return 7
    if isinstance(kind, (ovo_fields.Float, ovo_fields.NonNegativeFloat)):
        return 1.5
    if isinstance(kind, ovo_fields.Boolean):
        return True
    if isinstance(kind, ovo_fields.DateTime):
        return NOW
    if isinstance(kind, ovo_fields.Dict):
        return {"k": "v"}
    if isinstance(kind, fields.JSONDict):
        return {"volumes": {"vol-1": "/dev/vdb"}, "rules": [{"protocol": "tcp"}], "n": 1}
    if isinstance(kind, ovo_fields.String):
        return "text"
    raise AssertionError(f"no sample for {field!r}")


def populated(objname: str) -> FleetObject:
    """An instance of the newest registered ``objname`` with every field set."""
    cls = FleetObjectRegistry.fleet_classes()[objname][0]
    obj = cls()
    for name, field in cls.fields.items():
        setattr(obj, name, sample_value(field))
    return obj
