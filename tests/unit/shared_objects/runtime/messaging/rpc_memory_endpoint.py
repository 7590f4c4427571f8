"""The endpoint the in-memory RPC tests call (``test_messaging_rpc_memory*.py``), its local error
and the settings of their transports.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
import structlog.contextvars

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import Target, expose

TOPIC = "compute"


class LocalError(Exception):
    """Defined in this test module; allowed or not per test."""


class Endpoint:
    target = Target(version="1.3")

    def __init__(self, name: str = "s1") -> None:
        self.name = name
        self.seen: list[Any] = []
        self.running = 0
        self.max_running = 0
        self.release = asyncio.Event()

    @expose
    async def echo(self, ctxt: RequestContext, value: Any) -> dict[str, Any]:
        self.seen.append(value)
        return {
            "value": value,
            "server": self.name,
            "caller": ctxt.caller,
            "request_id": ctxt.request_id,
        }

    @expose
    async def sleep(self, ctxt: RequestContext, seconds: float) -> str:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.running -= 1
        return "slept"

    @expose
    async def log_context(self, ctxt: RequestContext) -> dict[str, Any]:
        return dict(structlog.contextvars.get_contextvars())

    @expose
    async def fail_local(self, ctxt: RequestContext) -> None:
        raise LocalError("local failure")

    @expose
    async def fail_builtin(self, ctxt: RequestContext) -> None:
        raise KeyError("missing")

    @expose
    async def unserialisable(self, ctxt: RequestContext) -> object:
        return object()


def memory_config(user: str = "guest", **overrides: Any) -> MessagingConfig:
    return MessagingConfig(
        transport_url=f"memory://{user}@unit/", control_exchange="fleet-unit", **overrides
    )
