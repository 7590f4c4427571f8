"""The transport's ``on_reconnect`` hook, and the memory driver's simulated connection loss."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    MessageDeliveryFailure,
    MessageUndeliverable,
    RPCClient,
    RPCServer,
    Target,
    expose,
    get_transport,
)
from shared_objects.runtime.messaging.memory import MemoryDriver


class Recorder:
    def __init__(self) -> None:
        self.seen: asyncio.Queue[int] = asyncio.Queue()

    @expose
    async def note(self, ctxt: RequestContext, i: int) -> None:
        self.seen.put_nowait(i)


def _config(login: str, broker: str, exchange: str) -> MessagingConfig:
    return MessagingConfig(transport_url=f"memory://{login}@{broker}", control_exchange=exchange)


async def test_casts_sent_while_a_servers_link_is_down_are_lost_and_it_is_told_on_reconnect() -> (
    None
):
    broker, exchange = uuid.uuid4().hex, f"x-{uuid.uuid4().hex[:8]}"
    server_side = get_transport(_config("server", broker, exchange))
    client_side = get_transport(_config("client", broker, exchange))
    endpoint = Recorder()
    told: list[str] = []
    async with server_side, client_side:
        remove = server_side.on_reconnect(lambda: told.append("back"))
        server = RPCServer(server_side, Target(topic="t", server="s1"), [endpoint])
        async with server:
            client = RPCClient(client_side, Target(topic="t", server="s1"), timeout=5)
            ctxt = RequestContext()
            await client.cast(ctxt, "note", i=1)
            assert await asyncio.wait_for(endpoint.seen.get(), 5) == 1

            link = server_side.driver
            assert isinstance(link, MemoryDriver)
            link.simulate_connection_loss()
            with pytest.raises(MessageUndeliverable):  # its queue went with the "restart"
                await client.cast(ctxt, "note", i=2)
            with pytest.raises(MessageDeliveryFailure):  # and it cannot publish meanwhile
                await RPCClient(server_side, Target(topic="t", server="s1")).cast(ctxt, "note", i=3)
            assert told == []

            await link.simulate_reconnect()
            assert told == ["back"]
            assert server_side.stats()["reconnects"] == 1
            await client.cast(ctxt, "note", i=4)  # queue and consumer are back
            assert await asyncio.wait_for(endpoint.seen.get(), 5) == 4
            assert endpoint.seen.empty()

            remove()
            link.simulate_connection_loss()
            await link.simulate_reconnect()
            assert told == ["back"]


async def test_a_failing_reconnect_listener_does_not_stop_the_others() -> None:
    transport = get_transport(_config("a", uuid.uuid4().hex, "x"))
    told: list[int] = []

    def broken() -> None:
        raise RuntimeError("boom")

    async with transport:
        transport.on_reconnect(broken)
        transport.on_reconnect(lambda: told.append(1))
        link = transport.driver
        assert isinstance(link, MemoryDriver)
        link.simulate_connection_loss()
        await link.simulate_reconnect()
    assert told == [1]
