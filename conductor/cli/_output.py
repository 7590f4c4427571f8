"""Tables for people, JSON for programs (``fleetctl --format json ...``)."""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO


def _plain(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return value


def object_dict(obj: Any, fields: Sequence[str]) -> dict[str, Any]:
    """The named fields of an object (unset ones as None), JSON-ready."""
    return {f: _plain(getattr(obj, f)) if obj.obj_attr_is_set(f) else None for f in fields}


def render_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    out = [line, "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"]
    out.append(line)
    for row in cells:
        out.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |")
    out.append(line)
    return "\n".join(out)


def emit(
    fmt: str,
    rows: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    columns: Sequence[str],
    *,
    stream: TextIO | None = None,
) -> None:
    """Print ``rows`` (a list, or one record) as a table or as JSON."""
    stream = stream or sys.stdout
    if fmt == "json":
        stream.write(json.dumps(rows, default=str, indent=2) + "\n")
        return
    if isinstance(rows, Mapping):
        width = max(len(k) for k in rows) if rows else 0
        for key, value in rows.items():
            stream.write(f"{key.ljust(width)}  {'' if value is None else value}\n")
        return
    stream.write(render_table(rows, columns) + "\n")
