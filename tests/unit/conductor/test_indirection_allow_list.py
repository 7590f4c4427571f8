"""The indirection endpoints refuse anything but remotable methods of registered objects,
answer clearly, keep serving and leave the database untouched."""

from __future__ import annotations

from typing import Any

import pytest

from conductor.indirection import ConductorIndirectionEndpoint, remotable_methods
from conductor.testing import (
    CURRENT_INSTANCE_VERSION,
    NEWER_INSTANCE_FIELD,
    NEWER_INSTANCE_VERSION,
    LocalConductor,
    isolated_registry,
    register_newer_instance,
    snapshot,
)
from shared_objects import exception
from shared_objects.base import obj_tree_get_versions
from shared_objects.objects import Flavor, Instance

MANIFEST = obj_tree_get_versions("Instance")


def test_allow_list_holds_only_public_remotables() -> None:
    allowed = remotable_methods(Instance)
    assert {"get_by_uuid", "create", "save", "destroy"} <= set(allowed)
    assert allowed["get_by_uuid"].is_classmethod and not allowed["save"].is_classmethod
    for name in ("obj_reset_changes", "_from_db_object", "__init__", "__class__", "obj_clone"):
        assert name not in allowed


async def _seed(conductor: LocalConductor) -> Instance:
    ctxt = conductor.agent_context()
    flavor = Flavor(ctxt, name="m1", vcpus=1, memory_mb=64, root_gb=1)
    await flavor.create()
    inst = Instance(ctxt, name="vm", host="h1", node="n1", flavor=flavor, vm_state="active")
    await inst.create()
    return inst


def _class_call(**overrides: Any) -> dict[str, Any]:
    call: dict[str, Any] = {
        "objname": "Instance",
        "objmethod": "get_by_uuid",
        "object_versions": MANIFEST,
        "args": [],
        "kwargs": {},
    }
    call.update(overrides)
    return call


HOSTILE_CLASS_CALLS = [
    (
        "unknown object",
        _class_call(objname="Nope", object_versions={**MANIFEST, "Nope": "1.0"}),
        exception.UnknownObject,
    ),
    ("non-remotable", _class_call(objmethod="obj_reset_changes"), exception.ObjectMethodNotAllowed),
    ("dunder class", _class_call(objmethod="__class__"), exception.ObjectMethodNotAllowed),
    ("private", _class_call(objmethod="_from_db_object"), exception.ObjectMethodNotAllowed),
    ("init", _class_call(objmethod="__init__"), exception.ObjectMethodNotAllowed),
    (
        "instance method as class action",
        _class_call(objmethod="save"),
        exception.ObjectMethodNotAllowed,
    ),
    (
        "method name not a string",
        _class_call(objmethod=["get_by_uuid"]),
        exception.ObjectMethodNotAllowed,
    ),
    (
        "other major",
        _class_call(object_versions={**MANIFEST, "Instance": "2.0"}),
        exception.UnsupportedObjectVersion,
    ),
    (
        "bad version",
        _class_call(object_versions={**MANIFEST, "Instance": "one"}),
        exception.InvalidObjectCall,
    ),
    (
        "manifest not a mapping",
        _class_call(object_versions=["Instance"]),
        exception.InvalidObjectCall,
    ),
    ("uuid not a string", _class_call(args=[123]), exception.InvalidObjectCall),
    (
        "expected_attrs not a list",
        _class_call(args=["u"], kwargs={"expected_attrs": "flavor"}),
        exception.InvalidObjectCall,
    ),
    (
        "unknown keyword",
        _class_call(args=["u"], kwargs={"drop": "tables"}),
        exception.InvalidObjectCall,
    ),
    ("too many args", _class_call(args=["u", [], 3]), exception.InvalidObjectCall),
    ("args not a list", _class_call(args="u"), exception.InvalidObjectCall),
    (
        "unloadable attribute",
        _class_call(args=["u"], kwargs={"expected_attrs": ["__dict__"]}),
        exception.ObjectActionError,
    ),
]


@pytest.mark.parametrize(
    ("label", "call", "error"), HOSTILE_CLASS_CALLS, ids=[c[0] for c in HOSTILE_CLASS_CALLS]
)
async def test_hostile_class_actions_get_clear_errors(
    conductor: LocalConductor, label: str, call: dict[str, Any], error: type[Exception]
) -> None:
    inst = await _seed(conductor)
    before = await snapshot(conductor.database)
    ctxt = conductor.agent_context()
    with pytest.raises(error):
        await conductor.api.client.call(ctxt, "object_class_action_versions", **call)
    # Still serving, nothing changed.
    assert await conductor.api.ping(ctxt, label) == label
    assert (await Instance.get_by_uuid(ctxt, inst.uuid)).name == "vm"
    assert await snapshot(conductor.database) == before


def _instance_primitive(uuid: str) -> dict[str, Any]:
    return Instance(uuid=uuid, name="evil").obj_to_primitive()


async def test_hostile_object_actions_get_clear_errors(conductor: LocalConductor) -> None:
    inst = await _seed(conductor)
    before = await snapshot(conductor.database)
    ctxt = conductor.agent_context()
    good = _instance_primitive(inst.uuid)
    cases: list[tuple[dict[str, Any], type[Exception]]] = [
        ({"objinst": good, "objmethod": "obj_reset_changes"}, exception.ObjectMethodNotAllowed),
        ({"objinst": good, "objmethod": "__init__"}, exception.ObjectMethodNotAllowed),
        ({"objinst": good, "objmethod": "_from_db_object"}, exception.ObjectMethodNotAllowed),
        ({"objinst": good, "objmethod": "get_by_uuid"}, exception.ObjectMethodNotAllowed),
        ({"objinst": "Instance", "objmethod": "save"}, exception.InvalidObjectCall),
        (
            {"objinst": {"versioned_object.name": "Instance"}, "objmethod": "save"},
            exception.InvalidObjectPrimitive,
        ),
        (
            {"objinst": {**good, "versioned_object.version": "2.0"}, "objmethod": "save"},
            exception.UnsupportedObjectVersion,
        ),
        (
            {"objinst": {**good, "versioned_object.data": {"progress": "x"}}, "objmethod": "save"},
            exception.InvalidObjectPrimitive,
        ),
        (
            {"objinst": good, "objmethod": "save", "kwargs": {"expected_task_state": 5}},
            exception.InvalidObjectCall,
        ),
        ({"objinst": good, "objmethod": "save", "args": [1, 2, 3]}, exception.InvalidObjectCall),
    ]
    for call, error in cases:
        call = {"args": [], "kwargs": {}, **call}
        with pytest.raises(error):
            await conductor.api.client.call(ctxt, "object_action", **call)
        assert await conductor.api.ping(ctxt, 1) == 1
    assert await snapshot(conductor.database) == before


async def test_backport_of_bad_input_is_refused(conductor: LocalConductor) -> None:
    ctxt = conductor.agent_context()
    with pytest.raises(exception.InvalidObjectCall):
        await conductor.api.client.call(
            ctxt, "object_backport_versions", objinst="x", object_versions=MANIFEST
        )
    with pytest.raises(exception.InvalidObjectCall):
        await conductor.api.client.call(
            ctxt,
            "object_backport_versions",
            objinst=_instance_primitive("3f0b1b6c-2b9e-4b7e-9d1c-4a3e2c7a2b11"),
            object_versions={"Flavor": "1.0"},
        )


async def test_newer_conductor_answers_an_older_caller_at_its_version(
    conductor: LocalConductor,
) -> None:
    inst = await _seed(conductor)
    endpoint: ConductorIndirectionEndpoint = conductor.endpoint
    with isolated_registry():
        newer = register_newer_instance()
        async with conductor.db_context() as ctxt:
            # The conductor itself now reads the newer minor (with the new field set)...
            assert getattr(await newer.get_by_uuid(ctxt, inst.uuid), NEWER_INSTANCE_FIELD)
        ctxt = conductor.agent_context()
        reply = await endpoint.object_class_action_versions(
            ctxt, "Instance", "get_by_uuid", MANIFEST, [inst.uuid], {}
        )
        # ...but a caller that knows only the release's version gets that, without it.
        assert reply["versioned_object.version"] == CURRENT_INSTANCE_VERSION
        assert NEWER_INSTANCE_FIELD not in reply["versioned_object.data"]
        assert reply["versioned_object.data"]["uuid"] == inst.uuid
        newer_reply = await endpoint.object_class_action_versions(
            ctxt,
            "Instance",
            "get_by_uuid",
            {**MANIFEST, "Instance": NEWER_INSTANCE_VERSION},
            [inst.uuid],
            {},
        )
        # A caller at our versions gets the object as is (the RPC layer serialises it).
        assert isinstance(newer_reply, Instance)
        newer_primitive = newer_reply.obj_to_primitive()
        assert newer_primitive["versioned_object.version"] == NEWER_INSTANCE_VERSION
        assert newer_primitive["versioned_object.data"][NEWER_INSTANCE_FIELD]
        # object_backport_versions does the same for a primitive the caller could not read.
        objinst = Instance.obj_from_primitive(newer_primitive)
        backported = await endpoint.object_backport_versions(ctxt, objinst, MANIFEST)
        assert backported["versioned_object.version"] == CURRENT_INSTANCE_VERSION
        assert NEWER_INSTANCE_FIELD not in backported["versioned_object.data"]
        assert backported["versioned_object.data"]["name"] == "vm"


async def test_object_backport_versions_over_rpc_returns_the_older_version(
    conductor: LocalConductor,
) -> None:
    inst = await _seed(conductor)
    with isolated_registry():
        newer = register_newer_instance()
        async with conductor.db_context() as ctxt:
            primitive = (await newer.get_by_uuid(ctxt, inst.uuid)).obj_to_primitive()
        assert primitive["versioned_object.version"] == NEWER_INSTANCE_VERSION
        back = await conductor.api.object_backport_versions(
            conductor.agent_context(), primitive, MANIFEST
        )
    assert back.VERSION == CURRENT_INSTANCE_VERSION
    assert back.uuid == inst.uuid and back.name == "vm"
    # Hydrated as the 1.0 class: the newer field does not even exist on it.
    assert NEWER_INSTANCE_FIELD not in back.fields
