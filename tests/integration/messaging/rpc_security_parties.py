"""The parties of the RPC security tests on RabbitMQ (``test_rpc_security*.py``): a conductor
endpoint, a policy by login, the logins of a conductor and two agents, an ignoring consumer
(forged replies and reply checks: ``shared_objects.testing.forged``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from shared_objects.context import RequestContext
from shared_objects.runtime.messaging import Transport, expose
from shared_objects.runtime.messaging.exceptions import RequestRefused
from shared_objects.testing.broker_logins import BrokerLogins

HEX32 = "[0-9a-f]{32}"
MakeTransport = Callable[[str], Transport]  # the ``transport_as`` fixture (conftest.py)


class Conductor:
    """What a conductor serves: state that refused calls must leave alone."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, str | None]] = []
        self.things = {"a", "b"}
        self.release = asyncio.Event()
        self.release.set()

    @expose
    async def echo(self, ctxt: RequestContext, value: Any = None) -> dict[str, Any]:
        self.calls.append(("echo", value, ctxt.caller))
        await self.release.wait()
        return {"value": value, "caller": ctxt.caller, "is_admin": ctxt.is_admin}

    @expose
    async def delete_everything(self, ctxt: RequestContext) -> int:
        self.calls.append(("delete_everything", None, ctxt.caller))
        deleted = len(self.things)
        self.things.clear()
        return deleted


class LoginPolicy:
    """An authorizer keyed by login, as a service would build from its identities."""

    def __init__(self, table: dict[str, set[str]]) -> None:
        self.table = table
        self.refused: list[tuple[str | None, str]] = []

    def covers(self, namespace: str | None, method: str) -> bool:
        return namespace is None and method in self.table

    def authorize(self, ctxt: RequestContext, namespace: str | None, method: str) -> None:
        if ctxt.caller not in self.table[method]:
            self.refused.append((ctxt.caller, method))
            raise RequestRefused(f"{ctxt.caller} may not call {method}")


async def ignore_delivery(message: Any) -> None:
    return None


def three_parties(logins: BrokerLogins) -> tuple[str, str, str]:
    """The logins of conductor ``1`` and of the agents of ``compute-1`` and ``compute-2``."""
    return (
        logins.conductor_login("1"),
        logins.host_login("compute-1"),
        logins.host_login("compute-2"),
    )
