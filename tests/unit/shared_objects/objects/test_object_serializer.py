"""FleetObjectSerializer: objects ↔ primitives, containers, malformed input, backports."""

from __future__ import annotations

from typing import Any

import pytest

from conductor.testing import (
    CURRENT_INSTANCE_VERSION,
    NEWER_INSTANCE_FIELD,
    NEWER_INSTANCE_VERSION,
    isolated_registry,
    register_newer_instance,
)
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.objects import Flavor, Instance
from shared_objects.serializer import FleetObjectSerializer

UUID = "3f0b1b6c-2b9e-4b7e-9d1c-4a3e2c7a2b11"


async def test_objects_in_containers_round_trip() -> None:
    ser = FleetObjectSerializer()
    ctxt = RequestContext()
    flavor = Flavor(name="m1", vcpus=1)
    value = {"a": [flavor, (1, Instance(uuid=UUID))], "b": 2}
    wire = await ser.serialize_entity(ctxt, value)
    assert wire["a"][0]["versioned_object.name"] == "Flavor"
    back = await ser.deserialize_entity(ctxt, wire)
    assert isinstance(back["a"][0], Flavor) and back["a"][0].name == "m1"
    assert back["a"][0]._context is ctxt
    assert isinstance(back["a"][1][1], Instance) and back["a"][1][1].uuid == UUID
    assert back["b"] == 2


@pytest.mark.parametrize(
    "primitive",
    [
        {"versioned_object.name": 5},
        {"versioned_object.name": "Instance", "versioned_object.version": "x"},
        {
            "versioned_object.name": "Instance",
            "versioned_object.version": "1.0",
            "versioned_object.namespace": "nova",
            "versioned_object.data": {},
        },
        {
            "versioned_object.name": "Instance",
            "versioned_object.version": "1.0",
            "versioned_object.namespace": "fleet",
            "versioned_object.data": [],
        },
        {
            "versioned_object.name": "Instance",
            "versioned_object.version": "1.0",
            "versioned_object.namespace": "fleet",
            "versioned_object.data": {"progress": "not a number"},
        },
        {
            "versioned_object.name": "Instance",
            "versioned_object.version": "1.0",
            "versioned_object.namespace": "fleet",
            "versioned_object.data": {"flavor": {"versioned_object.name": "Flavor"}},
        },
    ],
)
async def test_malformed_primitives_raise_invalid_object_primitive(primitive: Any) -> None:
    with pytest.raises(exception.InvalidObjectPrimitive):
        await FleetObjectSerializer().deserialize_entity(RequestContext(), primitive)


async def test_unknown_object_name_is_refused() -> None:
    primitive = {
        "versioned_object.name": "Nope",
        "versioned_object.version": "1.0",
        "versioned_object.namespace": "fleet",
        "versioned_object.data": {},
    }
    with pytest.raises(exception.UnknownObject):
        await FleetObjectSerializer().deserialize_entity(RequestContext(), primitive)


class BackportingAPI:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    async def object_backport_versions(self, context: Any, objinst: Any, versions: Any) -> Any:
        self.calls.append((objinst, versions))
        data = {
            k: v for k, v in objinst["versioned_object.data"].items() if k != NEWER_INSTANCE_FIELD
        }
        return {
            **objinst,
            "versioned_object.version": CURRENT_INSTANCE_VERSION,
            "versioned_object.data": data,
        }


async def test_too_new_object_is_backported_through_the_indirection_api_and_counted() -> None:
    with isolated_registry():
        newer = register_newer_instance()
        primitive = newer(uuid=UUID, **{NEWER_INSTANCE_FIELD: "x"}).obj_to_primitive()
    api = BackportingAPI()
    ser = FleetObjectSerializer(indirection_api=api)  # type: ignore[arg-type]
    obj = await ser.deserialize_entity(RequestContext(), primitive)
    assert isinstance(obj, Instance) and obj.VERSION == CURRENT_INSTANCE_VERSION
    assert obj.uuid == UUID
    assert ser.backport_count == 1
    sent, versions = api.calls[0]
    assert sent["versioned_object.version"] == NEWER_INSTANCE_VERSION
    assert versions["Instance"] == CURRENT_INSTANCE_VERSION


async def test_too_new_object_without_indirection_is_a_clear_error() -> None:
    with isolated_registry():
        newer = register_newer_instance()
        primitive = newer(uuid=UUID).obj_to_primitive()
    with pytest.raises(exception.UnsupportedObjectVersion, match=NEWER_INSTANCE_VERSION):
        await FleetObjectSerializer().deserialize_entity(RequestContext(), primitive)


async def test_serializer_with_a_manifest_sends_older_versions() -> None:
    with isolated_registry():
        newer = register_newer_instance()
        ser = FleetObjectSerializer(version_manifest={"Instance": CURRENT_INSTANCE_VERSION})
        note = {NEWER_INSTANCE_FIELD: "x"}
        wire = await ser.serialize_entity(RequestContext(), newer(uuid=UUID, **note))
    assert wire["versioned_object.version"] == CURRENT_INSTANCE_VERSION
    assert NEWER_INSTANCE_FIELD not in wire["versioned_object.data"]


def _instance_primitive(**data: Any) -> dict[str, Any]:
    return {
        "versioned_object.name": "Instance",
        "versioned_object.version": "1.0",
        "versioned_object.namespace": "fleet",
        "versioned_object.data": {"uuid": UUID, **data},
        "versioned_object.changes": ["vm_state"],
    }


@pytest.mark.parametrize(
    "data",
    [{"vm_state": "exploded"}, {"vcpus": -1}, {"launched_at": "yesterday"}, {"progress": "x"}],
)
async def test_wire_values_are_still_validated(data: dict[str, Any]) -> None:
    with pytest.raises(exception.InvalidObjectPrimitive):
        await FleetObjectSerializer().deserialize_entity(
            RequestContext(), _instance_primitive(**data)
        )


async def test_wire_values_keep_their_types_and_changes() -> None:
    obj = await FleetObjectSerializer().deserialize_entity(
        RequestContext(),
        _instance_primitive(vm_state="active", progress="7", name="vm", vcpus=2, host=None),
    )
    assert (obj.vm_state, obj.progress, obj.name, obj.vcpus, obj.host) == (
        "active",
        7,
        "vm",
        2,
        None,
    )
    assert obj.obj_what_changed() == {"vm_state"}
    assert obj.obj_to_primitive()["versioned_object.data"]["progress"] == 7
