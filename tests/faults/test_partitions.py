"""Network faults between a peer and the broker, injected with the loopback TCP proxy.

A private RabbitMQ node per test keeps the stale queues and half-dead connections these faults
leave behind away from the shared broker.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    MessagingError,
    MessagingTimeout,
    RPCClient,
    RPCServer,
    Target,
    expose,
    get_transport,
)
from shared_objects.testing import CallStream, RabbitNode, TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SLACK = 1.0


class Echo:
    @expose
    async def echo(self, ctxt: RequestContext, i: int, delay: float = 0.0) -> int:
        if delay:
            await asyncio.sleep(delay)
        return i


@pytest.fixture
async def node() -> AsyncIterator[RabbitNode]:
    async with RabbitNode() as private_node:
        yield private_node


@pytest.fixture
async def proxy(node: RabbitNode) -> AsyncIterator[TcpProxy]:
    async with TcpProxy(node.port) as tcp_proxy:
        yield tcp_proxy


def _config(url: str, exchange: str, heartbeat: int = 2) -> MessagingConfig:
    return MessagingConfig(transport_url=url, control_exchange=exchange, heartbeat=heartbeat)


async def _await_service(client: RPCClient, within: float) -> float:
    """Seconds until a call succeeds again (short call timeouts, bounded overall)."""
    started = time.monotonic()
    last: BaseException | None = None
    while time.monotonic() - started < within:
        try:
            await client.prepare(timeout=2.0).call(RequestContext(), "echo", i=-1)
            return time.monotonic() - started
        except MessagingError as exc:
            last = exc
            await asyncio.sleep(0.2)
    raise AssertionError(f"service did not resume within {within} s; last error: {last!r}")


async def test_blackholed_server_makes_calls_time_out_cleanly_and_heals(
    node: RabbitNode, proxy: TcpProxy
) -> None:
    exchange = f"fleet-test-{uuid.uuid4().hex[:8]}"
    async with (
        get_transport(_config(proxy.url(), exchange)) as server_transport,
        get_transport(_config(node.url, exchange)) as client_transport,
    ):
        async with RPCServer(server_transport, Target(topic="part", server="s1"), [Echo()]):
            client = RPCClient(client_transport, Target(topic="part"), timeout=2.0)
            ctxt = RequestContext()
            assert await asyncio.gather(
                *(client.call(ctxt, "echo", i=i) for i in range(10))
            ) == list(range(10))

            proxy.blackhole()
            durations = []
            # ~12 s of partition: longer than the heartbeat timeout on both sides.
            for i in range(5):
                started = time.monotonic()
                with pytest.raises(MessagingTimeout):
                    await asyncio.wait_for(client.call(ctxt, "echo", i=i), 2.0 + SLACK + 5)
                durations.append(time.monotonic() - started)
                await asyncio.sleep(0.4)
            assert max(durations) < 2.0 + SLACK, durations
            assert min(durations) >= 1.9, durations

            proxy.heal()
            resumed_after = await _await_service(client, within=45)
            results = await asyncio.gather(*(client.call(ctxt, "echo", i=i) for i in range(50)))
            assert results == list(range(50))
            assert client_transport.pending_replies == 0
            # The server noticed the dead link and reconnected through the proxy by itself.
            assert proxy.accepted >= 2
            assert server_transport.stats()["reconnects"] >= 1
            print(f"\nservice resumed {resumed_after:.1f} s after heal; proxy saw {proxy.accepted}")


async def test_client_connection_reset_mid_stream_no_call_hangs(
    node: RabbitNode, proxy: TcpProxy
) -> None:
    exchange = f"fleet-test-{uuid.uuid4().hex[:8]}"
    async with (
        get_transport(_config(node.url, exchange)) as server_transport,
        get_transport(_config(proxy.url(), exchange)) as client_transport,
    ):
        async with RPCServer(server_transport, Target(topic="reset", server="s1"), [Echo()]):
            client = RPCClient(client_transport, Target(topic="reset"), timeout=3.0)
            ctxt = RequestContext()
            stream = CallStream(
                lambda i: client.call(ctxt, "echo", i=i, delay=0.1), deadline=3.0 + SLACK + 5
            )
            running = asyncio.create_task(stream.run(300, concurrency=16))
            await stream.wait_finished(50, within=60)
            proxy.reset()
            outcomes = await asyncio.wait_for(running, 120)

            assert stream.hung == []
            assert max(o.elapsed for o in outcomes) < 3.0 + SLACK
            assert all(isinstance(o.error, MessagingError) for o in stream.failed), [
                repr(o.error) for o in stream.failed[:5]
            ]
            assert all(o.result == o.index for o in stream.succeeded)
            # The reset really cut the client off (it had to reconnect). Calls may all succeed
            # anyway: the reply queue is not exclusive, so replies wait there for the client.
            assert client_transport.stats()["reconnects"] >= 1

            await _await_service(client, within=30)
            results = await asyncio.gather(*(client.call(ctxt, "echo", i=i) for i in range(50)))
            assert results == list(range(50))
            assert client_transport.pending_replies == 0
            assert proxy.accepted >= 2


async def test_blackholed_client_no_call_hangs_and_service_heals(
    node: RabbitNode, proxy: TcpProxy
) -> None:
    """The caller's own link is cut: publishes cannot be confirmed, replies cannot arrive."""
    exchange = f"fleet-test-{uuid.uuid4().hex[:8]}"
    async with (
        get_transport(_config(node.url, exchange)) as server_transport,
        get_transport(_config(proxy.url(), exchange)) as client_transport,
    ):
        async with RPCServer(server_transport, Target(topic="cpart", server="s1"), [Echo()]):
            client = RPCClient(client_transport, Target(topic="cpart"), timeout=2.0)
            ctxt = RequestContext()
            assert await client.call(ctxt, "echo", i=1) == 1

            proxy.blackhole()
            # 40 calls at concurrency 8 span ~10 s: past the heartbeat timeout (2 s), so some
            # calls are in flight when the client's connection is declared dead.
            stream = CallStream(lambda i: client.call(ctxt, "echo", i=i), deadline=2.0 + SLACK + 5)
            outcomes = await stream.run(40, concurrency=8)
            assert stream.hung == []
            assert stream.succeeded == []
            assert max(o.elapsed for o in outcomes) < 2.0 + SLACK

            proxy.heal()
            await _await_service(client, within=45)
            results = await asyncio.gather(*(client.call(ctxt, "echo", i=i) for i in range(20)))
            assert results == list(range(20))
            assert client_transport.pending_replies == 0


async def test_calls_cut_off_by_a_dead_client_connection_raise_messaging_errors(
    node: RabbitNode, proxy: TcpProxy
) -> None:
    exchange = f"fleet-test-{uuid.uuid4().hex[:8]}"
    async with (
        get_transport(_config(node.url, exchange)) as server_transport,
        get_transport(_config(proxy.url(), exchange)) as client_transport,
    ):
        async with RPCServer(server_transport, Target(topic="cdead", server="s1"), [Echo()]):
            client = RPCClient(client_transport, Target(topic="cdead"), timeout=2.0)
            ctxt = RequestContext()
            assert await client.call(ctxt, "echo", i=1) == 1
            proxy.blackhole()
            stream = CallStream(lambda i: client.call(ctxt, "echo", i=i), deadline=2.0 + SLACK + 5)
            outcomes = await stream.run(40, concurrency=8)
            proxy.heal()
            leaked = [o for o in outcomes if not isinstance(o.error, MessagingError)]
            assert leaked == [], f"{len(leaked)} calls raised {type(leaked[0].error).__name__}"
