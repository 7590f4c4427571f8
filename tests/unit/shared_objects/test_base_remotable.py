"""The object base: remotable marking, no lazy load, no database on agents, change tracking."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from shared_objects import exception, releases
from shared_objects.base import FleetObject, is_remotable
from shared_objects.context import RequestContext
from shared_objects.objects import Flavor, Instance, InstanceList, Service
from shared_objects.objects._common import utcnow


class RecordingIndirection:
    """An indirection API that records calls and answers canned replies."""

    def __init__(self, class_result: Any = None, action_reply: Any = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.class_result = class_result
        self.action_reply = action_reply if action_reply is not None else ({}, None)

    async def object_class_action_versions(
        self,
        context: Any,
        objname: str,
        objmethod: str,
        object_versions: Any,
        args: Any,
        kwargs: Any,
    ) -> Any:
        self.calls.append(("class", objname, objmethod, object_versions, args, kwargs))
        return self.class_result

    async def object_action(
        self, context: Any, objinst: Any, objmethod: str, args: Any, kwargs: Any
    ) -> Any:
        self.calls.append(("action", objinst, objmethod, args, kwargs))
        return self.action_reply

    async def object_backport_versions(self, context: Any, objinst: Any, versions: Any) -> Any:
        raise AssertionError("not expected")


@pytest.fixture
def indirection() -> Any:
    api = RecordingIndirection()
    previous = FleetObject.indirection_api
    FleetObject.indirection_api = api
    yield api
    FleetObject.indirection_api = previous


def test_remotable_methods_are_marked_and_keep_the_original() -> None:
    assert is_remotable(Instance.save)
    assert is_remotable(Instance.get_by_uuid)
    assert Instance.save.original_fn.__name__ == "save"  # type: ignore[attr-defined]
    assert not is_remotable(Instance.obj_reset_changes)
    assert not is_remotable(Instance._from_db_object)


def test_touching_an_unloaded_attribute_raises_a_clear_error() -> None:
    inst = Instance(uuid="3f0b1b6c-2b9e-4b7e-9d1c-4a3e2c7a2b11")
    with pytest.raises(exception.ObjectAttributeNotLoaded, match="expected_attrs"):
        _ = inst.flavor


async def test_agent_without_indirection_has_no_database_access() -> None:
    with pytest.raises(exception.NoDatabaseAccess, match=r"(?i)no database access on this service"):
        await Instance.get_by_uuid(RequestContext(), "3f0b1b6c-2b9e-4b7e-9d1c-4a3e2c7a2b11")


async def test_instance_method_without_context_is_orphaned() -> None:
    with pytest.raises(exception.OrphanedObjectError):
        await Instance(uuid="3f0b1b6c-2b9e-4b7e-9d1c-4a3e2c7a2b11").save()


async def test_class_remotable_sends_the_version_manifest(
    indirection: RecordingIndirection,
) -> None:
    await InstanceList.get_by_host(RequestContext(), "h1", expected_attrs=["flavor"])
    kind, objname, method, manifest, args, kwargs = indirection.calls[0]
    assert (kind, objname, method) == ("class", "InstanceList", "get_by_host")
    for name in ("InstanceList", "Instance", "Flavor", "SecurityGroupList"):
        assert manifest[name] == releases.CURRENT.objects[name]
    assert args == ("h1",)
    assert kwargs == {"expected_attrs": ["flavor"]}


async def test_save_sends_only_the_key_and_changed_fields(
    indirection: RecordingIndirection,
) -> None:
    inst = Instance(
        RequestContext(), uuid="3f0b1b6c-2b9e-4b7e-9d1c-4a3e2c7a2b11", host="h1", name="vm"
    )
    inst.obj_reset_changes()
    inst.task_state = "spawning"
    inst.progress = 5
    await inst.save(expected_task_state=None)
    _, sent, method, args, kwargs = indirection.calls[0]
    assert args == ()
    assert method == "save"
    assert kwargs == {"expected_task_state": None}
    primitive = sent.obj_to_primitive()
    assert set(primitive["versioned_object.data"]) == {"uuid", "task_state", "progress"}
    assert set(primitive["versioned_object.changes"]) == {"task_state", "progress"}


async def test_action_updates_are_mirrored_and_changes_reset(
    indirection: RecordingIndirection,
) -> None:
    indirection.action_reply = (
        {"updated_at": "2026-01-02T03:04:05Z", "progress": 9, "obj_what_changed": []},
        None,
    )
    inst = Instance(RequestContext(), uuid="3f0b1b6c-2b9e-4b7e-9d1c-4a3e2c7a2b11")
    inst.progress = 5
    await inst.save()
    assert inst.progress == 9
    assert inst.updated_at is not None and inst.updated_at.year == 2026
    assert inst.obj_what_changed() == set()


def test_service_is_up_follows_the_heartbeat_age() -> None:
    now = utcnow()
    svc = Service(last_seen_up=now, forced_down=False)
    assert svc.is_up
    assert svc.is_up_at(now, 60)
    assert not svc.is_up_at(now + datetime.timedelta(seconds=61), 60)
    svc.forced_down = True
    assert not svc.is_up_at(now, 60)


def test_flavor_embedded_copy_round_trips() -> None:
    flavor = Flavor(id=1, flavorid="f1", name="m1", vcpus=2, memory_mb=512, root_gb=1)
    copy = Flavor.from_embedded(None, flavor.to_embedded())
    assert (copy.flavorid, copy.name, copy.vcpus, copy.memory_mb) == ("f1", "m1", 2, 512)
    assert copy.obj_what_changed() == set()
