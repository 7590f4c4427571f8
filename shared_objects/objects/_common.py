"""Helpers shared by the object modules (row copying, timestamps, expected_attrs checks)."""

from __future__ import annotations

import datetime
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from oslo_versionedobjects import fields as ovo_fields

from shared_objects import exception
from shared_objects.base import FleetObject

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
