"""Fleet and oslo.messaging servers share one topic: declarations must be argument-identical.

If Fleet declared ``<topic>``, the fanout exchange or its reply queue with other arguments than
oslo does for the same options (durable, quorum, transient quorum), the broker would refuse the
second declaration with 406 PRECONDITION_FAILED. Each option set runs on a private RabbitMQ node,
so the durable and quorum queues it creates never touch the shared broker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import RPCClient, RPCServer, Target, expose, get_transport
from shared_objects.testing import PeerProcess, RabbitNode

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

OPTION_SETS: dict[str, dict[str, bool]] = {
    "defaults": {},
    "durable": {"amqp_durable_queues": True},
    "quorum": {"rabbit_quorum_queue": True},
    "quorum+transient-quorum": {"rabbit_quorum_queue": True, "rabbit_transient_quorum_queue": True},
}


class Endpoint:
    """The Fleet member of the mixed pool: names itself in every answer."""

    target = Target(version="1.3")

    def __init__(self) -> None:
        self.notes: list[dict[str, Any]] = []

    @expose
    async def echo(self, ctxt: RequestContext, **kwargs: Any) -> dict[str, Any]:
        return {"args": kwargs, "server": "fleet1"}

    @expose
    async def note(self, ctxt: RequestContext, **kwargs: Any) -> None:
        self.notes.append(kwargs)


@pytest.fixture
async def node() -> AsyncIterator[RabbitNode]:
    async with RabbitNode() as private_node:
        yield private_node


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
async def test_fleet_and_oslo_servers_share_a_topic_under_the_same_options(
    node: RabbitNode,
    start_oslo_peer: Any,
    options: dict[str, bool],
    topic: str,
    control_exchange: str,
) -> None:
    oslo_server: PeerProcess = await start_oslo_peer(
        "server", url=node.url, rabbit_opts=options, servers="oslo1"
    )
    config = MessagingConfig(transport_url=node.url, control_exchange=control_exchange, **options)
    endpoint = Endpoint()
    async with get_transport(config) as transport:
        # Declares <topic>, <topic>.fleet1, the fanout exchange and queue next to oslo's.
        async with RPCServer(transport, Target(topic=topic, server="fleet1"), [endpoint]):
            client = RPCClient(transport, Target(topic=topic), timeout=10)
            ctxt = RequestContext()
            answered = {(await client.call(ctxt, "echo", i=i))["server"] for i in range(12)}
            assert answered == {"oslo1", "fleet1"}  # one queue, consumed by both kinds
            for server in ("oslo1", "fleet1"):
                reply = await client.prepare(server=server).call(ctxt, "echo", i=-1)
                assert reply["server"] == server

            oslo_client: PeerProcess = await start_oslo_peer(
                "client", url=node.url, rabbit_opts=options
            )
            seen = set()
            for i in range(12):
                command = {"op": "call", "method": "echo", "args": {"i": i}, "timeout": 10}
                reply = await oslo_client.request(command, within=20)
                assert reply["ok"], reply
                seen.add(reply["result"]["server"])
            assert seen == {"oslo1", "fleet1"}

            await client.prepare(fanout=True).cast(ctxt, "note", n=1)
            await oslo_server.wait_event(lambda e: e.get("method") == "note", within=10)
            fanout = {"op": "cast", "method": "note", "args": {"n": 2}, "fanout": True}
            assert (await oslo_client.request(fanout, within=20))["ok"]
            await oslo_server.wait_events(lambda e: e.get("method") == "note", 2, within=10)
            # A round trip through the Fleet server bounds the time its casts may still take.
            await client.prepare(server="fleet1").call(ctxt, "echo")
            assert sorted(n["n"] for n in endpoint.notes) == [1, 2]
