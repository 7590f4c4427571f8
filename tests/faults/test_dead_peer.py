"""A server process is SIGKILLed with calls in flight: callers get MessagingTimeout, none hangs."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import MessagingTimeout, RPCClient, Target, get_transport
from shared_objects.testing import CallStream, PeerProcess, RabbitNode

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SERVER_PEER = Path(__file__).resolve().parent / "peers" / "fleet_server.py"
SLACK = 1.0


@pytest.fixture
async def node() -> AsyncIterator[RabbitNode]:
    async with RabbitNode() as private_node:
        yield private_node


async def _start_server(url: str, exchange: str, topic: str) -> PeerProcess:
    argv = [sys.executable, str(SERVER_PEER), "--url", url, "--exchange", exchange]
    peer = PeerProcess([*argv, "--topic", topic, "--server", "victim"], name="fleet-server")
    await peer.start()
    try:
        await peer.wait_event(lambda e: e.get("event") == "ready", within=30)
    except BaseException:
        await peer.__aexit__(None, None, None)
        raise
    return peer


async def test_killed_server_process_makes_calls_time_out_and_a_new_one_serves(
    node: RabbitNode,
) -> None:
    exchange, topic = f"fleet-test-{uuid.uuid4().hex[:8]}", "victim-topic"
    config = MessagingConfig(transport_url=node.url, control_exchange=exchange)
    async with get_transport(config) as transport:
        client = RPCClient(transport, Target(topic=topic), timeout=4.0)
        ctxt = RequestContext()
        server = await _start_server(node.url, exchange, topic)
        try:
            assert (await client.call(ctxt, "echo", i=1))["i"] == 1

            # 8 slow calls in flight (the server acks before handling, as oslo does), then crash.
            stream = CallStream(
                lambda i: client.call(ctxt, "echo", i=i, delay=3.0), deadline=4.0 + SLACK + 5
            )
            in_flight = asyncio.create_task(stream.run(8, concurrency=8))
            await asyncio.sleep(0.5)
            await server.kill()
            assert server.returncode is not None
            outcomes = await asyncio.wait_for(in_flight, 30)
            assert stream.hung == []
            assert all(isinstance(o.error, MessagingTimeout) for o in outcomes), outcomes
            assert all(o.elapsed < 4.0 + SLACK for o in outcomes)

            # Later calls to the dead peer (topic and server-targeted) time out too, promptly.
            for cctx in (client.prepare(timeout=1.5), client.prepare(server="victim", timeout=1.5)):
                started = time.monotonic()
                with pytest.raises(MessagingTimeout, match="echo"):
                    await asyncio.wait_for(cctx.call(ctxt, "echo", i=2), 10)
                assert 1.4 <= time.monotonic() - started < 1.5 + SLACK
            assert transport.pending_replies == 0
        finally:
            await server.__aexit__(None, None, None)

        # A replacement server process takes over the same queues; the client needs no restart.
        async with await _start_server(node.url, exchange, topic):
            results = await asyncio.gather(*(client.call(ctxt, "echo", i=i) for i in range(20)))
            assert [r["i"] for r in results] == list(range(20))
