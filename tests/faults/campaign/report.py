"""The campaign's result: one row per fault, printed as a table or written as JSON."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass
class Row:
    fault: str
    fault_detail: str
    load: str
    attempted: int = 0
    succeeded: int = 0
    failed_clean: int = 0
    #: Operations that did not end, or ended wrongly (accepted and then lost).
    failed_unclean: int = 0
    stuck_instances: int = 0
    #: Seconds from the fault's end until the invariant check first passed (None: never).
    recovery_s: float | None = None
    invariants_ok: bool = False
    note: str = ""
    violations: list[str] = dataclasses.field(default_factory=list)
    #: Stuck instances with their state and the log lines that mention them.
    stuck: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: Operations that did not succeed: kind, target, API error, outcome, detail.
    failed_ops: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    phase_seconds: float = 0.0
    logs: str = ""
    error: str | None = None  # the harness itself failed in this phase

    @property
    def green(self) -> bool:
        return self.error is None and self.invariants_ok and self.stuck_instances == 0


COLUMNS = (
    ("fault", 34),
    ("load", 36),
    ("ops", 5),
    ("ok", 5),
    ("clean", 6),
    ("unclean", 8),
    ("stuck", 6),
    ("recovery", 9),
    ("invariants", 10),
)


def table(rows: Sequence[Row]) -> str:
    """A plain-text table (one line per fault) and, below it, what went wrong where."""
    head = "  ".join(name.ljust(width) for name, width in COLUMNS)
    lines = [head, "-" * len(head)]
    for row in rows:
        recovery = f"{row.recovery_s:.1f} s" if row.recovery_s is not None else "never"
        verdict = "error" if row.error else ("green" if row.invariants_ok else "RED")
        cells = (
            row.fault,
            row.load,
            str(row.attempted),
            str(row.succeeded),
            str(row.failed_clean),
            str(row.failed_unclean),
            str(row.stuck_instances),
            recovery,
            verdict,
        )
        lines.append("  ".join(c[:w].ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True)))
    total_stuck = sum(r.stuck_instances for r in rows)
    green = sum(1 for r in rows if r.green)
    lines.append("-" * len(head))
    lines.append(f"{green}/{len(rows)} faults green, {total_stuck} instance(s) stuck")
    for row in rows:
        if row.green and not row.note:
            continue
        lines.append("")
        lines.append(f"== {row.fault}: {row.fault_detail}" + (f"; {row.note}" if row.note else ""))
        if row.error:
            lines.append(f"   harness error: {row.error}")
        for violation in row.violations[:12]:
            lines.append(f"   ! {violation}")
        if len(row.violations) > 12:
            lines.append(f"   ... {len(row.violations) - 12} more")
        for op in row.failed_ops[:8]:
            lines.append(
                f"   op {op['kind']} {op['target'] or ''}: {op['outcome']} ({op['detail']})"
            )
        if row.logs:
            lines.append(f"   logs: {row.logs}")
    return "\n".join(lines)


def to_json(rows: Sequence[Row], **extra: Any) -> str:
    doc = {
        **extra,
        "green": all(r.green for r in rows),
        "stuck_instances": sum(r.stuck_instances for r in rows),
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    return json.dumps(doc, indent=2, default=str)
