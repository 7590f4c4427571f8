"""Broker restart mid-stream (acceptance c): no call hangs, and service resumes by itself.

Runs on a private RabbitMQ node (the shared one must never be restarted). Client and server use
separate transports, as they would in separate processes.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    MessagingError,
    RPCClient,
    RPCServer,
    Target,
    expose,
    get_transport,
)
from shared_objects.testing import CallStream, RabbitNode

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CALL_TIMEOUT = 5.0
# A call may finish a little after its own timeout (scheduling on a busy 2-core machine), but a
# call still running this long after its timeout is hanging.
SLACK = 1.5


class Echo:
    @expose
    async def echo(self, ctxt: RequestContext, i: int) -> int:
        # Slow enough that the 500 calls (~4 s at concurrency 32) straddle the restart.
        await asyncio.sleep(0.25)
        return i


@pytest.fixture
async def node() -> AsyncIterator[RabbitNode]:
    async with RabbitNode() as private_node:
        yield private_node


def _config(url: str, exchange: str) -> MessagingConfig:
    return MessagingConfig(transport_url=url, control_exchange=exchange, heartbeat=5)


async def _await_service(client: RPCClient, within: float) -> float:
    """Seconds until a call succeeds again (calls with a short timeout, bounded overall)."""
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


def _error_summary(stream: CallStream) -> dict[str, int]:
    return dict(collections.Counter(type(o.error).__name__ for o in stream.failed))


async def test_broker_restart_mid_stream_no_call_hangs_and_service_resumes(
    node: RabbitNode,
) -> None:
    exchange = f"fleet-test-{uuid.uuid4().hex[:8]}"
    server_transport = get_transport(_config(node.url, exchange))
    client_transport = get_transport(_config(node.url, exchange))
    async with server_transport, client_transport:
        server = RPCServer(server_transport, Target(topic="restart", server="s1"), [Echo()])
        async with server:
            client = RPCClient(client_transport, Target(topic="restart"), timeout=CALL_TIMEOUT)
            ctxt = RequestContext(user_id="tester")
            stream = CallStream(
                lambda i: client.call(ctxt, "echo", i=i), deadline=CALL_TIMEOUT + SLACK + 5
            )
            running = asyncio.create_task(stream.run(500, concurrency=32))
            await stream.wait_finished(100, within=60)
            restart_at = time.monotonic()
            await node.restart_app(down_for=1.0)
            restart_took = time.monotonic() - restart_at
            outcomes = await asyncio.wait_for(running, 180)

            assert len(outcomes) == 500
            assert stream.hung == [], f"{len(stream.hung)} calls hung"
            slow = [o for o in outcomes if o.elapsed > CALL_TIMEOUT + SLACK]
            assert slow == [], f"{len(slow)} calls outlived timeout+slack: {slow[:3]}"
            for outcome in outcomes:
                if outcome.ok:
                    assert outcome.result == outcome.index  # each result reached its own caller
                else:
                    assert isinstance(outcome.error, MessagingError), repr(outcome.error)
            # The restart really hit the stream: calls were in flight across it (handlers and
            # reply queues now survive a restart, so such calls may well succeed, late).
            restart_end = restart_at + restart_took
            spanning = [o for o in outcomes if o.started < restart_at < o.started + o.elapsed]
            assert spanning, "no call was in flight during the restart; the test proves nothing"
            # And calls were waiting across the broker's return: issued while it was down, their
            # publish is retried (and, topic calls, waits for the server's queue to be back).
            across = [o for o in outcomes if o.started < restart_end - 0.5 < o.started + o.elapsed]
            assert across or stream.failed, "no call waited across the broker's return"
            assert len(stream.succeeded) >= 100

            # Without restarting client or server: consumers and reply queue come back.
            resumed_after = await _await_service(client, within=60)
            after = await asyncio.gather(
                *(client.call(ctxt, "echo", i=i) for i in range(100)), return_exceptions=True
            )
            assert after == list(range(100))
            targeted = await client.prepare(server="s1").call(ctxt, "echo", i=7)
            assert targeted == 7
            assert client_transport.pending_replies == 0
            print(
                f"\nbroker restart took {restart_took:.1f} s; {len(stream.succeeded)} ok, "
                f"failed {_error_summary(stream)}, max call "
                f"{max(o.elapsed for o in outcomes):.2f} s; service back {resumed_after:.1f} s "
                f"after the restart; client reconnects {client_transport.stats().get('reconnects')}"
            )


async def test_broker_restart_while_idle_then_calls_and_casts_work(node: RabbitNode) -> None:
    exchange = f"fleet-test-{uuid.uuid4().hex[:8]}"
    received: asyncio.Queue[int] = asyncio.Queue()

    class Recorder(Echo):
        @expose
        async def note(self, ctxt: RequestContext, i: int) -> None:
            received.put_nowait(i)

    async with (
        get_transport(_config(node.url, exchange)) as server_transport,
        get_transport(_config(node.url, exchange)) as client_transport,
    ):
        async with RPCServer(server_transport, Target(topic="idle", server="s1"), [Recorder()]):
            client = RPCClient(client_transport, Target(topic="idle"), timeout=CALL_TIMEOUT)
            assert await client.call(RequestContext(), "echo", i=1) == 1
            await node.restart_app(down_for=0.5)
            await _await_service(client, within=60)
            assert await client.call(RequestContext(), "echo", i=2) == 2
            await client.prepare(fanout=True).cast(RequestContext(), "note", i=3)
            await client.cast(RequestContext(), "note", i=4)
            async with asyncio.timeout(10):
                assert sorted([await received.get(), await received.get()]) == [3, 4]
            # Both noticed the restart and reconnected (robust reconnect, not luck).
            assert server_transport.stats()["reconnects"] >= 1
            assert client_transport.stats()["reconnects"] >= 1


async def test_broker_crash_fails_calls_promptly_and_a_replacement_broker_is_picked_up(
    node: RabbitNode,
) -> None:
    """SIGKILL of the broker VM (no clean close), then a fresh node on the same port."""
    exchange = f"fleet-test-{uuid.uuid4().hex[:8]}"
    async with (
        get_transport(_config(node.url, exchange)) as server_transport,
        get_transport(_config(node.url, exchange)) as client_transport,
    ):
        async with RPCServer(server_transport, Target(topic="crash", server="s1"), [Echo()]):
            client = RPCClient(client_transport, Target(topic="crash"), timeout=3.0)
            ctxt = RequestContext()
            stream = CallStream(lambda i: client.call(ctxt, "echo", i=i), deadline=3.0 + SLACK + 5)
            running = asyncio.create_task(stream.run(200, concurrency=32))
            await stream.wait_finished(40, within=60)
            await node.kill()
            outcomes = await asyncio.wait_for(running, 120)
            assert stream.hung == []
            assert max(o.elapsed for o in outcomes) < 3.0 + SLACK
            assert all(isinstance(o.error, MessagingError) for o in stream.failed)
            assert len(stream.failed) >= 32  # everything after the crash failed, and clearly

            # A new, empty broker on the same address: robust reconnect re-declares exchanges,
            # queues and bindings, and the server consumes again, without any restart.
            async with RabbitNode(port=node.port):
                await _await_service(client, within=60)
                results = await asyncio.gather(*(client.call(ctxt, "echo", i=i) for i in range(50)))
                assert results == list(range(50))
                assert await client.prepare(server="s1").call(ctxt, "echo", i=5) == 5
                assert client_transport.pending_replies == 0
