"""Where a message goes (client side) or what a server listens on (server side)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """oslo.messaging-style destination: exchange, topic, server, namespace, version, fanout.

    ``exchange`` ``None`` means the transport's control exchange. Calling a target returns a copy
    with some fields replaced (``target(server="h1")``), like oslo's ``Target.__call__``.
    """

    topic: str | None = None
    server: str | None = None
    namespace: str | None = None
    version: str | None = None
    exchange: str | None = None
    fanout: bool = False

    def __call__(self, **changes: Any) -> Target:
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)]
        return "<Target " + ", ".join(p for p in parts if not p.endswith("=None")) + ">"
