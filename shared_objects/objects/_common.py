"""Helpers shared by the object modules (row copying, timestamps, expected_attrs checks)."""

from __future__ import annotations

import datetime
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from shared_objects import exception
from shared_objects.base import FleetObject


def utcnow() -> datetime.datetime:
    """The current time, timezone-aware UTC (what DateTimeField stores)."""
    return datetime.datetime.now(datetime.UTC)


def copy_row(obj: FleetObject, row: Mapping[str, Any], skip: Collection[str] = ()) -> None:
    """Set every field of ``obj`` present in ``row`` (except ``skip``), then reset changes."""
    for name in obj.fields:
        if name in skip or name not in row:
            continue
        setattr(obj, name, row[name])


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
