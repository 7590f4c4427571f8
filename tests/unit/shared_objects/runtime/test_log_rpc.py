"""One request id across hops: the JSON log lines written inside RPC handlers carry it."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.log import configure_logging, get_logger
from shared_objects.runtime.messaging import (
    MemoryBroker,
    RPCClient,
    RPCServer,
    Target,
    expose,
    get_transport,
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    libraries = {name: logging.getLogger(name).level for name in ("aiormq", "aio_pika", "asyncio")}
    yield
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in libraries.items():
        logging.getLogger(name).setLevel(old)
    structlog.reset_defaults()


class Agent:
    """Logs, then calls the next hop (if any) with the context it received."""

    def __init__(self, name: str, next_hop: RPCClient | None) -> None:
        self.log = get_logger(f"test.{name}")
        self.name = name
        self.next_hop = next_hop

    @expose
    async def hop(self, ctxt: RequestContext) -> str:
        self.log.info("handling hop", agent=self.name)
        if self.next_hop is not None:
            await self.next_hop.call(ctxt, "hop")
        return self.name


async def test_request_id_follows_a_call_through_two_servers() -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    broker = MemoryBroker()
    cfg = MessagingConfig(transport_url="memory://log@unit/", control_exchange="logtest")
    transport = get_transport(cfg, memory_broker=broker)
    async with transport:
        to_b = RPCClient(transport, Target(topic="b"), timeout=2.0)
        to_a = RPCClient(transport, Target(topic="a"), timeout=2.0)
        async with (
            RPCServer(transport, Target(topic="a", server="a1"), [Agent("a", to_b)]),
            RPCServer(transport, Target(topic="b", server="b1"), [Agent("b", None)]),
        ):
            ctxt = RequestContext()
            assert await to_a.call(ctxt, "hop") == "a"
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    hops = [e for e in events if e.get("event") == "handling hop"]
    assert [e["agent"] for e in hops] == ["a", "b"]
    assert {e["request_id"] for e in hops} == {ctxt.request_id}
    assert all(e["method"] == "hop" for e in hops)
