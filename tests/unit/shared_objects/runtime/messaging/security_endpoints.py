"""What the RPC runtime's security tests serve (``test_messaging_security*.py``): endpoints, a
recording serializer, a table policy, and the settings of their transports.
"""

from __future__ import annotations

import asyncio
from typing import Any

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import Target, codec, expose
from shared_objects.runtime.messaging.exceptions import RequestRefused

TOPIC = "compute"


def security_config(user: str) -> MessagingConfig:
    return MessagingConfig(transport_url=f"memory://{user}@sec/", control_exchange="fleet-sec")


class Endpoint:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.release = asyncio.Event()
        self.release.set()

    @expose
    async def echo(self, ctxt: RequestContext, value: Any = None) -> dict[str, Any]:
        self.calls.append(("echo", value))
        await self.release.wait()
        return {
            "value": value,
            "caller": ctxt.caller,
            "is_admin": ctxt.is_admin,
            "roles": ctxt.roles,
            "extra": ctxt.extra,
        }

    @expose
    async def delete_everything(self, ctxt: RequestContext) -> str:
        self.calls.append(("delete_everything", None))
        return "deleted"


class AdminEndpoint:
    target = Target(namespace="admin", version="1.0")

    @expose
    async def reset(self, ctxt: RequestContext) -> str:
        return "reset"


class RecordingSerializer:
    """Counts deserialisations: a refused request must never reach them."""

    def __init__(self) -> None:
        self.deserialized: list[Any] = []

    async def serialize_entity(self, ctxt: RequestContext, entity: Any) -> Any:
        return entity

    async def deserialize_entity(self, ctxt: RequestContext, primitive: Any) -> Any:
        self.deserialized.append(primitive)
        return primitive


class TablePolicy:
    """A minimal authorizer: (namespace, method) -> logins allowed."""

    def __init__(self, table: dict[tuple[str | None, str], set[str]]) -> None:
        self.table = table
        self.seen: list[tuple[str | None, str | None, bool, list[str]]] = []

    def covers(self, namespace: str | None, method: str) -> bool:
        return (namespace, method) in self.table

    def authorize(self, ctxt: RequestContext, namespace: str | None, method: str) -> None:
        self.seen.append((ctxt.caller, namespace, ctxt.is_admin, list(ctxt.roles)))
        if ctxt.caller not in self.table[(namespace, method)]:
            raise RequestRefused(f"{ctxt.caller} may not call {method}")


async def collect_into(into: list[dict[str, Any]], delivery: Any) -> None:
    into.append(codec.decode_message(delivery.body))
