"""Helpers shared by the object modules: row copying, timestamps, expected_attrs checks, and
the bodies of the ordinary ``create``/``save``/``destroy`` remotables and list reads.

The persistence helpers only hold the *body* of a remotable: each object keeps its own
``@remotable`` methods (oslo's fingerprint covers their names and signatures) and calls them.
An object whose method does something else on purpose (a compare-and-swap, a hard delete, a
uniqueness check) keeps its own body.
"""

from __future__ import annotations

import datetime
import uuid as uuidlib
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Literal, Protocol, TypeVar, cast

from oslo_utils import versionutils
from oslo_versionedobjects import fields as ovo_fields

from shared_objects import exception
from shared_objects.base import FleetObject, get_db

_STORAGE = "_obj_"  # where oslo's field properties keep their values


def utcnow() -> datetime.datetime:
    """The current time, timezone-aware UTC (what DateTimeField stores)."""
    return datetime.datetime.now(datetime.UTC)


# Field types whose stored value is exactly a plain Python type (no conversion on coerce).
_PLAIN_TYPES: tuple[tuple[type, type], ...] = (
    (ovo_fields.Boolean, bool),
    (ovo_fields.Enum, str),
    (ovo_fields.UUID, str),
    (ovo_fields.String, str),
    (ovo_fields.NonNegativeInteger, int),
    (ovo_fields.Integer, int),
    (ovo_fields.NonNegativeFloat, float),
    (ovo_fields.Float, float),
)
_ROW_PLANS: dict[type, tuple[tuple[str, type | None], ...]] = {}


def _row_plan(cls: type[FleetObject]) -> tuple[tuple[str, type | None], ...]:
    """For each field: the plain type a row value may be stored as directly, or None."""
    plan = _ROW_PLANS.get(cls)
    if plan is None:
        entries: list[tuple[str, type | None]] = []
        for name, field in cls.fields.items():
            plain = next((py for kind, py in _PLAIN_TYPES if isinstance(field._type, kind)), None)
            entries.append((name, plain))
        plan = _ROW_PLANS[cls] = tuple(entries)
    return plan


def copy_row(obj: FleetObject, row: Mapping[str, Any], skip: Collection[str] = ()) -> None:
    """Set every field of ``obj`` present in ``row`` (except ``skip``); the caller resets changes.

    Values the database already returns as the field's exact plain type (a ``str`` for a string
    or enum column, an ``int`` for an integer one, ...) are stored without oslo's coercion: the
    schema typed them, and this runs for every row of every read. Everything else (None,
    datetimes, JSON) goes through the field's setter.
    """
    for name, plain in _row_plan(type(obj)):
        if name in skip or name not in row:
            continue
        value = row[name]
        if plain is not None and type(value) is plain:
            object.__setattr__(obj, _STORAGE + name, value)
        else:
            setattr(obj, name, value)


def check_expected_attrs(
    objname: str, expected_attrs: Iterable[str] | None, allowed: Collection[str]
) -> list[str]:
    """Validate ``expected_attrs`` against what ``objname`` can load; returns a list."""
    attrs = list(expected_attrs or [])
    for attr in attrs:
        if not isinstance(attr, str) or attr not in allowed:
            raise exception.ObjectActionError(
                action=f"{objname} load",
                reason=f"cannot load {attr!r}; loadable attributes: {sorted(allowed)}",
            )
    return attrs


def db_values(obj: FleetObject, names: Iterable[str]) -> dict[str, Any]:
    """Column values for the named plain fields of ``obj`` (set ones only)."""
    return {name: getattr(obj, name) for name in names if obj.obj_attr_is_set(name)}


_Obj = TypeVar("_Obj", bound=FleetObject)
_List = TypeVar("_List", bound=FleetObject)

# Builds the exception a missing row raises; called only when the row is missing, so each
# object keeps its own NotFound class and kwargs without building an exception per call.
NotFoundFactory = Callable[[], Exception]


class StoredObject(Protocol):
    """What the persistence helpers use of an object kept in a table keyed by ``id``."""

    _context: Any
    id: int
    updated_at: datetime.datetime | None

    def obj_name(self) -> str: ...

    def obj_attr_is_set(self, attrname: str) -> bool: ...

    def obj_set_defaults(self, *attrs: str) -> None: ...

    def obj_get_changes(self) -> dict[str, Any]: ...

    def obj_reset_changes(self) -> None: ...

    def _from_db_object(self, context: Any, obj: Any, row: Mapping[str, Any], /) -> Any: ...


class SoftDeletable(StoredObject, Protocol):
    """A stored object whose ``destroy`` keeps the row (``FleetPersistentObject``)."""

    deleted: bool
    deleted_at: datetime.datetime | None


class _WithUuid(StoredObject, Protocol):
    uuid: str


class RowLoader(Protocol):
    """An object class as list reads use it: built empty, then filled by its own
    ``_from_db_object`` (so an object that extends that hook gets it in lists too)."""

    def __call__(self) -> Any: ...

    def _from_db_object(self, context: Any, obj: Any, row: Mapping[str, Any], /) -> Any: ...


def from_row(context: Any, obj: _Obj, row: Mapping[str, Any]) -> _Obj:
    """``obj`` filled from ``row``, bound to ``context`` and with nothing left to save: the
    plain ``_from_db_object`` of an object whose fields are all columns."""
    copy_row(obj, row)
    obj._context = context
    obj.obj_reset_changes()
    return obj


def list_from_rows(
    cls: type[_List], context: Any, rows: Iterable[Mapping[str, Any]], item: RowLoader
) -> _List:
    """A ``cls`` list object of ``item`` objects, one per row, with nothing left to save."""
    result = cls(context, objects=[item._from_db_object(context, item(), row) for row in rows])
    result.obj_reset_changes()
    return result


async def insert_row(
    obj: StoredObject,
    table: str,
    *,
    defaults: tuple[str, ...] | Literal["all"],
    new_uuid: bool = False,
) -> None:
    """The body of an ordinary ``create()``: insert ``obj``'s set fields and reload it.

    ``defaults`` names the fields whose declared defaults fill in when unset (``"all"``: every
    field that has one). ``new_uuid`` generates a uuid when the caller gave none. Refuses an
    object that already has an ``id``, since it was created already.
    """
    objname = obj.obj_name()
    if obj.obj_attr_is_set("id"):
        raise exception.ObjectAlreadyCreated(objname=objname)
    if new_uuid and not obj.obj_attr_is_set("uuid"):
        # Only objects with a uuid field pass new_uuid; the protocol cannot say so.
        cast(_WithUuid, obj).uuid = str(uuidlib.uuid4())
    if defaults == "all":
        obj.obj_set_defaults()
    else:
        obj.obj_set_defaults(*defaults)
    values = obj.obj_get_changes()
    values["created_at"] = utcnow()
    row = await get_db(obj._context, objname, "create").insert(table, values)
    obj._from_db_object(obj._context, obj, row)


async def save_changes(obj: StoredObject, table: str, not_found: NotFoundFactory) -> None:
    """The body of an ordinary ``save()``: write the changed fields (and ``updated_at``) to the
    row with ``obj.id``; raises ``not_found()`` when that row is gone.

    A single, final write, so it is ``standalone`` (committed at once, see DatabaseAPI.update).
    """
    values = obj.obj_get_changes()
    if not values:
        return
    values["updated_at"] = utcnow()
    rows = await get_db(obj._context, obj.obj_name(), "save").update(
        table, {"id": obj.id}, values, returning=["updated_at"], standalone=True
    )
    if not rows:
        raise not_found()
    obj.updated_at = rows[0]["updated_at"]
    obj.obj_reset_changes()


async def soft_delete(obj: SoftDeletable, table: str, not_found: NotFoundFactory) -> None:
    """The body of an ordinary ``destroy()``: mark the live row with ``obj.id`` deleted (the
    row stays for history); raises ``not_found()`` when there is no such live row."""
    now = utcnow()
    rows = await get_db(obj._context, obj.obj_name(), "destroy").update(
        table,
        {"id": obj.id, "deleted": False},
        {"deleted": True, "deleted_at": now},
        returning=["deleted_at"],
    )
    if not rows:
        raise not_found()
    obj.deleted = True
    obj.deleted_at = rows[0]["deleted_at"]
    obj.obj_reset_changes()


def drop_added_fields(
    primitive: dict[str, Any],
    target_version: str,
    added: Mapping[tuple[int, int], Iterable[str]],
) -> None:
    """For ``obj_make_compatible``: remove from ``primitive`` the fields a reader at
    ``target_version`` does not know; ``added`` maps each version to the fields it added."""
    target = versionutils.convert_version_to_tuple(target_version)
    for version, names in added.items():
        if target < version:
            for name in names:
                primitive.pop(name, None)
