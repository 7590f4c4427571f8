"""Instance: a virtual machine, its placement, its state machine and its resources."""

from __future__ import annotations

import datetime
import uuid as uuidlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, NoReturn

from shared_objects import exception, fields
from shared_objects.base import (
    NOT_GIVEN,
    DatabaseAPI,
    FleetObject,
    FleetObjectRegistry,
    FleetPersistentObject,
    ObjectListBase,
    get_db,
    remotable,
)
from shared_objects.objects._common import check_expected_attrs, copy_row, drop_added_fields, utcnow
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.security_group import SecurityGroup, SecurityGroupList

TABLE = "instances"
SG_ASSOCIATION = "security_group_instance_association"

# Attributes that cost an extra column or query: loaded only when named in expected_attrs.
LOADABLE_ATTRS = ("flavor", "security_groups")
_NOT_COLUMNS = ("flavor", "security_groups")


def _state_condition(expected: Any) -> Any:
    """A ``where`` value for an expected state: one value, or any of a list (None allowed)."""
    if isinstance(expected, (list, tuple, set, frozenset)):
        return list(expected)
    return expected


def _state_matches(expected: Any, actual: Any) -> bool:
    if isinstance(expected, (list, tuple, set, frozenset)):
        return actual in expected
    return bool(actual == expected)


async def _load_security_groups(
    db: DatabaseAPI, context: Any, instance_uuids: Sequence[str]
) -> dict[str, SecurityGroupList]:
    """Security groups of many instances in two queries (no query per instance)."""
    out = {u: SecurityGroupList(context, objects=[]) for u in instance_uuids}
    if not instance_uuids:
        return out
    links = await db.select(
        SG_ASSOCIATION,
        {"instance_uuid": list(instance_uuids), "deleted": False},
        columns=["instance_uuid", "security_group_id"],
    )
    group_ids = sorted({link["security_group_id"] for link in links})
    groups: dict[int, Mapping[str, Any]] = {}
    if group_ids:
        for row in await db.select("security_groups", {"id": group_ids, "deleted": False}):
            groups[row["id"]] = row
    for link in links:
        group = groups.get(link["security_group_id"])
        if group is not None:
            sg = SecurityGroup._from_db_object(context, SecurityGroup(), group)
            out[link["instance_uuid"]].objects.append(sg)
    for sgl in out.values():
        sgl.obj_reset_changes()
    return out


@FleetObjectRegistry.register
class Instance(FleetPersistentObject, FleetObject):
    """A virtual machine. ``save()`` is a compare-and-swap on task/vm state."""

    # Version 1.0: Initial version
    # Version 1.1: Added locked and locked_reason
    VERSION = "1.1"

    # Typed views of the fields below (oslo makes them properties at registration).
    id: int
    uuid: str
    name: str | None
    user_id: str | None
    project_id: str | None
    host: str | None
    node: str | None
    vm_state: str | None
    task_state: str | None
    power_state: str | None
    flavor: Flavor
    vcpus: int
    memory_mb: int
    root_gb: int
    ephemeral_gb: int
    image_ref: str | None
    launched_at: datetime.datetime | None
    terminated_at: datetime.datetime | None
    progress: int | None
    security_groups: SecurityGroupList
    launch_index: int | None
    locked: bool
    locked_reason: str | None

    obj_identity_fields: ClassVar[tuple[str, ...]] = ("uuid",)

    fields = {
        "id": fields.IntegerField(),
        "uuid": fields.UUIDField(),
        "name": fields.StringField(nullable=True),
        "user_id": fields.StringField(nullable=True),
        "project_id": fields.StringField(nullable=True),
        "host": fields.StringField(nullable=True),
        "node": fields.StringField(nullable=True),
        "vm_state": fields.VMStateField(nullable=True),
        "task_state": fields.TaskStateField(nullable=True),
        "power_state": fields.PowerStateField(nullable=True),
        "flavor": fields.ObjectField("Flavor"),
        "vcpus": fields.NonNegativeIntegerField(default=0),
        "memory_mb": fields.NonNegativeIntegerField(default=0),
        "root_gb": fields.NonNegativeIntegerField(default=0),
        "ephemeral_gb": fields.NonNegativeIntegerField(default=0),
        "image_ref": fields.StringField(nullable=True),
        "launched_at": fields.DateTimeField(nullable=True),
        "terminated_at": fields.DateTimeField(nullable=True),
        "progress": fields.IntegerField(nullable=True),
        "security_groups": fields.ObjectField("SecurityGroupList"),
        "launch_index": fields.IntegerField(nullable=True),
        "locked": fields.BooleanField(default=False),
        "locked_reason": fields.StringField(nullable=True),
    }

    def obj_make_compatible(self, primitive: dict[str, Any], target_version: str) -> None:
        super().obj_make_compatible(primitive, target_version)
        drop_added_fields(primitive, target_version, {(1, 1): ("locked", "locked_reason")})

    @staticmethod
    def _from_db_object(
        context: Any,
        instance: Instance,
        row: Mapping[str, Any],
        expected_attrs: Iterable[str] | None = None,
        security_groups: SecurityGroupList | None = None,
    ) -> Instance:
        """The one place an ``instances`` row becomes an Instance."""
        attrs = set(expected_attrs or ())
        copy_row(instance, row, skip=_NOT_COLUMNS)
        if "flavor" in attrs and row.get("flavor") is not None:
            instance.flavor = Flavor.from_embedded(context, row["flavor"])
        if "security_groups" in attrs:
            instance.security_groups = (
                security_groups
                if security_groups is not None
                else SecurityGroupList(context, objects=[])
            )
        instance._context = context
        instance.obj_reset_changes(recursive=True)
        return instance

    @staticmethod
    def _columns(attrs: Iterable[str]) -> list[str] | None:
        # The flavor copy is the only large column: skip it unless asked for.
        return None if "flavor" in attrs else [*_ROW_COLUMNS]

    @classmethod
    @remotable
    async def get_by_uuid(
        cls, context: Any, uuid: str, expected_attrs: list[str] | None = None
    ) -> Instance:
        attrs = check_expected_attrs("Instance", expected_attrs, LOADABLE_ATTRS)
        db = get_db(context, "Instance", "get_by_uuid")
        row = await db.get(TABLE, {"uuid": uuid}, columns=cls._columns(attrs))
        if row is None:
            raise exception.InstanceNotFound(instance_uuid=uuid)
        groups = None
        if "security_groups" in attrs:
            groups = (await _load_security_groups(db, context, [uuid]))[uuid]
        return cls._from_db_object(context, cls(), row, attrs, groups)

    @remotable
    async def create(self) -> None:
        """Insert this instance (uuid generated when unset); flavor sizes fill the resources."""
        if self.obj_attr_is_set("id"):
            raise exception.ObjectAlreadyCreated(objname="Instance")
        db = get_db(self._context, "Instance", "create")
        if not self.obj_attr_is_set("uuid"):
            self.uuid = str(uuidlib.uuid4())
        if self.obj_attr_is_set("flavor"):
            for name in ("vcpus", "memory_mb", "root_gb", "ephemeral_gb"):
                if not self.obj_attr_is_set(name):
                    setattr(self, name, getattr(self.flavor, name))
        self.obj_set_defaults("vcpus", "memory_mb", "root_gb", "ephemeral_gb", "deleted", "locked")
        values = {k: v for k, v in self.obj_get_changes().items() if k not in _NOT_COLUMNS}
        attrs: list[str] = []
        if self.obj_attr_is_set("flavor"):
            values["flavor"] = self.flavor.to_embedded()
            attrs.append("flavor")
        values["created_at"] = utcnow()
        row = await db.insert(TABLE, values)
        groups = None
        if self.obj_attr_is_set("security_groups"):
            attrs.append("security_groups")
            groups = self.security_groups
            for sg in groups:
                await db.insert(
                    SG_ASSOCIATION,
                    {"instance_uuid": self.uuid, "security_group_id": sg.id, "deleted": False},
                )
        self._from_db_object(self._context, self, row, attrs, groups)

    @remotable(send_changes_only=True)
    async def save(
        self,
        expected_task_state: str | list[str | None] | None = NOT_GIVEN,
        expected_vm_state: str | list[str | None] | None = NOT_GIVEN,
    ) -> None:
        """Write the changed fields in ONE compare-and-swap statement.

        ``expected_task_state``/``expected_vm_state`` (a value, ``None``, or a list of
        acceptable values) are checked by the same UPDATE's WHERE clause; when no row matches,
        the current row tells which expectation failed.
        """
        changes = self.obj_get_changes()
        db = get_db(self._context, "Instance", "save")
        values = {k: v for k, v in changes.items() if k not in _NOT_COLUMNS}
        if "flavor" in changes:
            values["flavor"] = self.flavor.to_embedded()
        where: dict[str, Any] = {"uuid": self.uuid}
        if expected_task_state is not NOT_GIVEN:
            where["task_state"] = _state_condition(expected_task_state)
        if expected_vm_state is not NOT_GIVEN:
            where["vm_state"] = _state_condition(expected_vm_state)
        if not values and "security_groups" not in changes and len(where) == 1:
            return
        values["updated_at"] = utcnow()
        # Without a security group change the CAS is the request's only write: one statement,
        # committed on its own (see DatabaseAPI.update).
        standalone = "security_groups" not in changes
        rows = await db.update(
            TABLE, where, values, returning=["updated_at"], standalone=standalone
        )
        if not rows:
            await self._raise_save_conflict(db, expected_task_state, expected_vm_state)
        if "security_groups" in changes:
            await db.delete(SG_ASSOCIATION, {"instance_uuid": self.uuid})
            for sg in self.security_groups:
                await db.insert(
                    SG_ASSOCIATION,
                    {"instance_uuid": self.uuid, "security_group_id": sg.id, "deleted": False},
                )
        self.updated_at = rows[0]["updated_at"]
        self.obj_reset_changes(recursive=True)

    async def _raise_save_conflict(
        self, db: DatabaseAPI, expected_task_state: Any, expected_vm_state: Any
    ) -> NoReturn:
        current = await db.get(TABLE, {"uuid": self.uuid}, columns=["task_state", "vm_state"])
        if current is None:
            raise exception.InstanceNotFound(instance_uuid=self.uuid)
        if expected_task_state is not NOT_GIVEN and not _state_matches(
            expected_task_state, current["task_state"]
        ):
            raise exception.UnexpectedTaskStateError(
                instance_uuid=self.uuid, expected=expected_task_state, actual=current["task_state"]
            )
        raise exception.UnexpectedVMStateError(
            instance_uuid=self.uuid, expected=expected_vm_state, actual=current["vm_state"]
        )

    @remotable(send_changes_only=True)
    async def destroy(self) -> None:
        """Soft-delete: the row stays (``deleted``/``deleted_at`` set) for history."""
        now = utcnow()
        db = get_db(self._context, "Instance", "destroy")
        rows = await db.update(
            TABLE,
            {"uuid": self.uuid, "deleted": False},
            {"deleted": True, "deleted_at": now, "updated_at": now},
            returning=["deleted", "deleted_at", "updated_at"],
        )
        if not rows:
            raise exception.InstanceNotFound(instance_uuid=self.uuid)
        await db.update(
            SG_ASSOCIATION, {"instance_uuid": self.uuid}, {"deleted": True}, returning=[]
        )
        self.deleted = True
        self.deleted_at = rows[0]["deleted_at"]
        self.updated_at = rows[0]["updated_at"]
        self.obj_reset_changes()


_ROW_COLUMNS = tuple(name for name in Instance.fields if name not in _NOT_COLUMNS)


@FleetObjectRegistry.register
class InstanceList(ObjectListBase[Instance], FleetObject):
    # Version 1.0: Initial version
    VERSION = "1.0"

    # Typed views of the fields below (oslo makes them properties at registration).
    objects: Any

    fields = {
        "objects": fields.ListOfObjectsField("Instance"),
    }

    @classmethod
    async def _from_rows(
        cls, context: Any, db: DatabaseAPI, rows: list[dict[str, Any]], attrs: list[str]
    ) -> InstanceList:
        groups: dict[str, SecurityGroupList] = {}
        if "security_groups" in attrs:
            groups = await _load_security_groups(db, context, [r["uuid"] for r in rows])
        result = cls(context, objects=[])
        for row in rows:
            result.objects.append(
                Instance._from_db_object(context, Instance(), row, attrs, groups.get(row["uuid"]))
            )
        result.obj_reset_changes()
        return result

    @classmethod
    @remotable
    async def get_by_security_group(
        cls, context: Any, security_group_id: int, expected_attrs: list[str] | None = None
    ) -> InstanceList:
        """The live members of one security group, in two queries."""
        attrs = check_expected_attrs("InstanceList", expected_attrs, LOADABLE_ATTRS)
        db = get_db(context, "InstanceList", "get_by_security_group")
        links = await db.select(
            SG_ASSOCIATION,
            {"security_group_id": security_group_id, "deleted": False},
            columns=["instance_uuid"],
        )
        uuids = sorted({link["instance_uuid"] for link in links})
        rows = (
            await db.select(
                TABLE, {"uuid": uuids, "deleted": False}, columns=Instance._columns(attrs)
            )
            if uuids
            else []
        )
        return await cls._from_rows(context, db, rows, attrs)

    @classmethod
    @remotable
    async def get_all(cls, context: Any, expected_attrs: list[str] | None = None) -> InstanceList:
        """Every instance not deleted (operators' listings; one query)."""
        attrs = check_expected_attrs("InstanceList", expected_attrs, LOADABLE_ATTRS)
        db = get_db(context, "InstanceList", "get_all")
        rows = await db.select(TABLE, {"deleted": False}, columns=Instance._columns(attrs))
        return await cls._from_rows(context, db, rows, attrs)

    @classmethod
    @remotable
    async def get_by_host(
        cls, context: Any, host: str, expected_attrs: list[str] | None = None
    ) -> InstanceList:
        attrs = check_expected_attrs("InstanceList", expected_attrs, LOADABLE_ATTRS)
        db = get_db(context, "InstanceList", "get_by_host")
        rows = await db.select(
            TABLE, {"host": host, "deleted": False}, columns=Instance._columns(attrs)
        )
        return await cls._from_rows(context, db, rows, attrs)

    @classmethod
    @remotable
    async def get_by_host_and_node(
        cls, context: Any, host: str, node: str, expected_attrs: list[str] | None = None
    ) -> InstanceList:
        attrs = check_expected_attrs("InstanceList", expected_attrs, LOADABLE_ATTRS)
        db = get_db(context, "InstanceList", "get_by_host_and_node")
        rows = await db.select(
            TABLE,
            {"host": host, "node": node, "deleted": False},
            columns=Instance._columns(attrs),
        )
        return await cls._from_rows(context, db, rows, attrs)

    @classmethod
    @remotable
    async def get_by_uuids(
        cls, context: Any, uuids: list[str], expected_attrs: list[str] | None = None
    ) -> InstanceList:
        attrs = check_expected_attrs("InstanceList", expected_attrs, LOADABLE_ATTRS)
        db = get_db(context, "InstanceList", "get_by_uuids")
        rows = await db.select(TABLE, {"uuid": list(uuids)}, columns=Instance._columns(attrs))
        return await cls._from_rows(context, db, rows, attrs)
