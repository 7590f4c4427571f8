"""The shared create/save/destroy/list bodies, run through each object that uses them.

A recording database stands in for the conductor's, so these pin the exact statements
(table, where, values, ``returning``, ``standalone``) and the per-object NotFound errors that
the objects issued before their bodies moved to ``_common``.
"""

from __future__ import annotations

import datetime
import types
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from oslo_versionedobjects import fields as ovo_fields

from shared_objects import exception
from shared_objects.base import FleetObject
from shared_objects.objects import (
    BlockDeviceMapping,
    BlockDeviceMappingList,
    ComputeNode,
    ComputeNodeList,
    Flavor,
    FlavorList,
    InstanceFault,
    Migration,
    MigrationList,
    SecurityGroup,
    SecurityGroupList,
    SecurityGroupRule,
    SecurityGroupRuleList,
    Service,
    ServiceList,
)

NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


class RecordingDB:
    """Answers like the conductor's DatabaseAPI and records every call."""

    def __init__(self, *, matches: bool = True) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.matches = matches

    async def get(
        self, table: str, where: Mapping[str, Any], *, columns: Sequence[str] | None = None
    ) -> dict[str, Any] | None:
        self.calls.append(("get", (table, dict(where)), {}))
        return None

    async def insert(self, table: str, values: Mapping[str, Any]) -> dict[str, Any]:
        self.calls.append(("insert", (table, dict(values)), {}))
        return {**values, "id": 41}

    async def update(
        self,
        table: str,
        where: Mapping[str, Any],
        values: Mapping[str, Any],
        *,
        returning: Sequence[str] | None = None,
        standalone: bool = False,
    ) -> list[dict[str, Any]]:
        self.calls.append(
            (
                "update",
                (table, dict(where), dict(values)),
                {"returning": returning, "standalone": standalone},
            )
        )
        if not self.matches:
            return []
        return [{name: NOW for name in returning or ()}]


def _context(db: RecordingDB) -> Any:
    return types.SimpleNamespace(db=db)


def _loaded(cls: type[FleetObject], db: RecordingDB, **values: Any) -> Any:
    obj = cls(_context(db), id=7, **values)
    obj.obj_reset_changes()
    return obj


# (class, table, NotFound class, its kwargs for id 7)
SAVES = [
    (
        BlockDeviceMapping,
        "block_device_mappings",
        exception.BlockDeviceMappingNotFound,
        {"bdm_id": 7},
    ),
    (ComputeNode, "compute_nodes", exception.ComputeHostNotFound, {"host": 7, "node": None}),
    (Flavor, "flavors", exception.FlavorNotFound, {"flavor_id": 7}),
    (Migration, "migrations", exception.MigrationNotFound, {"migration_id": 7}),
    (SecurityGroup, "security_groups", exception.SecurityGroupNotFound, {"security_group_id": 7}),
    (Service, "services", exception.ServiceNotFound, {"service_id": 7}),
]
DESTROYS = [
    (
        BlockDeviceMapping,
        "block_device_mappings",
        exception.BlockDeviceMappingNotFound,
        {"bdm_id": 7},
    ),
    (ComputeNode, "compute_nodes", exception.ComputeHostNotFound, {"host": 7, "node": None}),
    (SecurityGroup, "security_groups", exception.SecurityGroupNotFound, {"security_group_id": 7}),
    (
        SecurityGroupRule,
        "security_group_rules",
        exception.SecurityGroupRuleNotFound,
        {"rule_id": 7},
    ),
    (Service, "services", exception.ServiceNotFound, {"service_id": 7}),
]


def _changed_field(cls: type[FleetObject]) -> tuple[str, Any]:
    """A plain string field of ``cls`` to change in a save."""
    for name in ("name", "host", "device_name", "source_compute"):
        if name in cls.fields:
            return name, "changed"
    raise AssertionError(f"no string field to change on {cls.obj_name()}")


@pytest.mark.parametrize(("cls", "table", "not_found", "kwargs"), SAVES)
async def test_save_writes_changes_in_one_standalone_update(
    cls: type[FleetObject], table: str, not_found: type[Exception], kwargs: dict[str, Any]
) -> None:
    db = RecordingDB()
    obj = _loaded(cls, db)
    name, value = _changed_field(cls)
    setattr(obj, name, value)

    await obj.save()  # type: ignore[attr-defined]

    [(op, args, options)] = db.calls
    assert op == "update"
    assert args[:2] == (table, {"id": 7})
    assert set(args[2]) == {name, "updated_at"} and args[2][name] == value
    assert options == {"returning": ["updated_at"], "standalone": True}
    assert obj.updated_at == NOW  # type: ignore[attr-defined]
    assert not obj.obj_what_changed()


@pytest.mark.parametrize(("cls", "table", "not_found", "kwargs"), SAVES)
async def test_save_without_changes_writes_nothing_and_a_gone_row_raises(
    cls: type[FleetObject], table: str, not_found: type[Exception], kwargs: dict[str, Any]
) -> None:
    db = RecordingDB(matches=False)
    obj = _loaded(cls, db)
    await obj.save()  # type: ignore[attr-defined]
    assert db.calls == []

    name, value = _changed_field(cls)
    setattr(obj, name, value)
    with pytest.raises(not_found) as raised:
        await obj.save()  # type: ignore[attr-defined]
    assert type(raised.value) is not_found
    assert raised.value.kwargs == kwargs  # type: ignore[attr-defined]
    assert name in obj.obj_what_changed()


@pytest.mark.parametrize(("cls", "table", "not_found", "kwargs"), DESTROYS)
async def test_destroy_soft_deletes_the_live_row(
    cls: type[FleetObject], table: str, not_found: type[Exception], kwargs: dict[str, Any]
) -> None:
    db = RecordingDB()
    obj = _loaded(cls, db)

    await obj.destroy()  # type: ignore[attr-defined]

    [(op, args, options)] = db.calls
    assert op == "update"
    assert args[:2] == (table, {"id": 7, "deleted": False})
    assert set(args[2]) == {"deleted", "deleted_at"} and args[2]["deleted"] is True
    assert options == {"returning": ["deleted_at"], "standalone": False}
    assert obj.deleted is True and obj.deleted_at == NOW  # type: ignore[attr-defined]
    assert not obj.obj_what_changed()

    with pytest.raises(not_found) as raised:
        await _loaded(cls, RecordingDB(matches=False)).destroy()  # type: ignore[attr-defined]
    assert type(raised.value) is not_found
    assert raised.value.kwargs == kwargs  # type: ignore[attr-defined]


# (class, table, required values, fields defaulted on create, whether a uuid is generated)
CREATES = [
    (
        BlockDeviceMapping,
        "block_device_mappings",
        {"instance_uuid": str(uuid.uuid4())},
        {"deleted", "delete_on_termination"},
        True,
    ),
    (
        ComputeNode,
        "compute_nodes",
        {"host": "h", "hypervisor_hostname": "n"},
        {
            name
            for name, f in ComputeNode.fields.items()
            if f.default is not ovo_fields.UnspecifiedDefault
        },
        True,
    ),
    (
        InstanceFault,
        "instance_faults",
        {"instance_uuid": str(uuid.uuid4()), "code": 500},
        {"deleted"},
        False,
    ),
    (
        Migration,
        "migrations",
        {
            "instance_uuid": str(uuid.uuid4()),
            "status": "accepted",
            "migration_type": "live-migration",
        },
        {"deleted"},
        True,
    ),
    (SecurityGroup, "security_groups", {"name": "web"}, {"deleted"}, True),
    (SecurityGroupRule, "security_group_rules", {"parent_group_id": 3}, {"deleted"}, False),
]


@pytest.mark.parametrize(("cls", "table", "given", "defaulted", "new_uuid"), CREATES)
async def test_create_inserts_set_and_defaulted_fields(
    cls: type[FleetObject],
    table: str,
    given: dict[str, Any],
    defaulted: set[str],
    new_uuid: bool,
) -> None:
    db = RecordingDB()
    obj = cls(_context(db), **given)

    await obj.create()  # type: ignore[attr-defined]

    [(op, (insert_table, values), _)] = db.calls
    assert op == "insert" and insert_table == table
    generated = {"uuid"} if new_uuid else set()
    assert set(values) == set(given) | defaulted | generated | {"created_at"}
    assert isinstance(values["created_at"], datetime.datetime)
    if new_uuid:
        assert uuid.UUID(values["uuid"])
    assert obj.id == 41 and obj._context.db is db  # type: ignore[attr-defined]
    assert not obj.obj_what_changed()

    with pytest.raises(exception.ObjectAlreadyCreated) as raised:
        await obj.create()  # type: ignore[attr-defined]
    assert raised.value.kwargs == {"objname": cls.obj_name()}
    assert len(db.calls) == 1


async def test_create_keeps_a_given_uuid() -> None:
    db = RecordingDB()
    given = str(uuid.uuid4())
    group = SecurityGroup(_context(db), name="web", uuid=given)
    await group.create()
    assert db.calls[0][1][1]["uuid"] == given == group.uuid


async def test_service_create_checks_for_a_live_twin_then_inserts_with_all_defaults() -> None:
    db = RecordingDB()
    service = Service(_context(db), host="h", binary="fleet-compute")
    await service.create()
    [get, (op, (table, values), _)] = db.calls
    assert get == (
        "get",
        ("services", {"host": "h", "binary": "fleet-compute", "deleted": False}),
        {},
    )
    assert op == "insert" and table == "services"
    defaulted = {
        name for name, f in Service.fields.items() if f.default is not ovo_fields.UnspecifiedDefault
    }
    assert set(values) == {"host", "binary", "created_at"} | defaulted


@pytest.mark.parametrize(
    ("list_cls", "item_cls", "row"),
    [
        (BlockDeviceMappingList, BlockDeviceMapping, {"id": 1, "instance_uuid": str(uuid.uuid4())}),
        (ComputeNodeList, ComputeNode, {"id": 1, "host": "h"}),
        (FlavorList, Flavor, {"id": 1, "name": "m1"}),
        (MigrationList, Migration, {"id": 1, "status": "running"}),
        (SecurityGroupList, SecurityGroup, {"id": 1, "name": "web"}),
        (SecurityGroupRuleList, SecurityGroupRule, {"id": 1, "parent_group_id": 2}),
        (ServiceList, Service, {"id": 1, "host": "h"}),
    ],
)
def test_list_from_rows_builds_clean_items_bound_to_the_context(
    list_cls: type[FleetObject], item_cls: type[FleetObject], row: dict[str, Any]
) -> None:
    from shared_objects.objects._common import list_from_rows

    context = _context(RecordingDB())
    result: Any = list_from_rows(list_cls, context, [row, {**row, "id": 2}], item_cls)
    assert type(result) is list_cls and result._context is context
    assert [type(o) for o in result] == [item_cls, item_cls]
    assert [o.id for o in result] == [1, 2]
    assert all(o._context is context and not o.obj_what_changed() for o in result)
    assert not result.obj_what_changed()
