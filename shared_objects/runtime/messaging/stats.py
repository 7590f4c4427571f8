"""Plain counters kept by clients and servers; exported to Prometheus elsewhere."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any


@dataclasses.dataclass(slots=True)
class RPCStats:
    """Calls by (method, outcome), calls in flight now, and messages dropped by reason."""

    calls: collections.Counter[tuple[str, str]] = dataclasses.field(
        default_factory=collections.Counter
    )
    dropped: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    in_flight: int = 0

    def record(self, method: str, outcome: str) -> None:
        self.calls[(method, outcome)] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": {f"{m}:{o}": n for (m, o), n in self.calls.items()},
            "dropped": dict(self.dropped),
            "in_flight": self.in_flight,
        }
