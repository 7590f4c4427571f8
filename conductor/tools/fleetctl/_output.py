"""Results on stdout: ``--format table`` for people, ``json``/``yaml`` for programs, ``value`` for
shell scripts; ``-c/--column`` picks the columns (repeatable, in the order given).

A listing is a list of rows; a single record (``show``) is one mapping, drawn as a two-column
``Field | Value`` table. ``value`` prints one row per line, its values separated by spaces (a
record: one value per line), with nothing around them, so ``$(fleetctl ... -f value -c uuid)``
works. YAML comes from PyYAML (imported only for ``--format yaml``); the table is a dozen lines
here rather than a dependency.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from conductor.tools.fleetctl._base import UsageError

FORMATS = ("table", "json", "yaml", "value")


def plain(value: Any) -> Any:
    """A JSON/YAML-ready value (datetimes as ISO 8601 text)."""
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return value


def object_dict(obj: Any, fields: Sequence[str]) -> dict[str, Any]:
    """The named fields of an object (unset ones as None), JSON-ready."""
    return {f: plain(getattr(obj, f)) if obj.obj_attr_is_set(f) else None for f in fields}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def render_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    out = [line, "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"]
    out.append(line)
    for row in cells:
        out.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |")
    out.append(line)
    return "\n".join(out)


def select_columns(available: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """``wanted`` (``-c``) checked against ``available``; all of them when none was asked."""
    if not wanted:
        return list(available)
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise UsageError(
            f"unknown column {', '.join(map(repr, unknown))}; columns: {', '.join(available)}"
        )
    return list(dict.fromkeys(wanted))


def emit(
    args: argparse.Namespace,
    rows: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    columns: Sequence[str] = (),
    *,
    stream: TextIO | None = None,
) -> None:
    """Print ``rows`` (a list, or one record) in ``args.format`` with ``args.column`` columns.

    ``columns`` are a listing's default columns (a record's are its keys). JSON and YAML carry
    every key of each row unless ``-c`` narrowed them.
    """
    stream = stream or sys.stdout
    fmt = getattr(args, "format", "table")
    wanted = getattr(args, "column", None)
    record = isinstance(rows, Mapping)
    if record:
        assert isinstance(rows, Mapping)
        keys = select_columns(list(rows), wanted)
        data: Any = {k: plain(rows[k]) for k in keys}
    else:
        assert not isinstance(rows, Mapping)
        available = list(dict.fromkeys([*columns, *(k for r in rows for k in r)]))
        keys = select_columns(available, wanted) if wanted else list(columns)
        if fmt in ("json", "yaml") and not wanted:
            data = [{k: plain(v) for k, v in r.items()} for r in rows]
        else:
            data = [{k: plain(r.get(k)) for k in keys} for r in rows]
    if fmt == "json":
        stream.write(json.dumps(data, default=str, indent=2) + "\n")
    elif fmt == "yaml":
        import yaml

        stream.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    elif fmt == "value":
        if record:
            for key in keys:
                stream.write(_cell(data[key]) + "\n")
        else:
            for row in data:
                stream.write(" ".join(_cell(row.get(k)) for k in keys) + "\n")
    elif record:
        pairs = [{"Field": k, "Value": data[k]} for k in keys]
        stream.write(render_table(pairs, ("Field", "Value")) + "\n")
    else:
        stream.write(render_table(data, keys) + "\n")


def message(args: argparse.Namespace, text: str, record: Mapping[str, Any]) -> None:
    """A command's outcome: ``text`` for people (table), ``record`` in any other format."""
    if getattr(args, "format", "table") == "table" and not getattr(args, "column", None):
        print(text)
    else:
        emit(args, record)
