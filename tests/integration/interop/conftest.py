"""Fixtures for interop tests: a real oslo.messaging peer in its own process, and a Fleet transport.

Every test gets a unique control exchange and topic; the peer process is always killed and the
queues the test created on the shared broker are deleted afterwards.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import aio_pika
import aiormq
import pytest

from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import Transport, get_transport
from shared_objects.testing import PeerProcess

PEERS = Path(__file__).resolve().parent / "peers"
OSLO_PEER = PEERS / "oslo_peer.py"
# interop_errors must be importable here too: Fleet re-creates its exceptions by module name.
if str(PEERS) not in sys.path:
    sys.path.insert(0, str(PEERS))

StartPeer = Callable[..., Awaitable[PeerProcess]]


@pytest.fixture
def topic() -> str:
    return f"interop-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def fleet_transport(amqp_url: str, control_exchange: str) -> AsyncIterator[Transport]:
    """A connected Fleet transport on the test's control exchange."""
    config = MessagingConfig(transport_url=amqp_url, control_exchange=control_exchange)
    transport = get_transport(config, allowed_remote_exmods=["interop_errors"])
    async with transport:
        yield transport


@pytest.fixture
async def start_oslo_peer(
    amqp_url: str, control_exchange: str, topic: str
) -> AsyncIterator[StartPeer]:
    """Start ``oslo_peer.py <mode>`` (own process and oslo transport); wait until it is ready.

    ``url`` overrides the broker (e.g. a private node); ``rabbit_opts`` are passed as
    ``[oslo_messaging_rabbit]`` overrides.
    """
    peers: list[PeerProcess] = []

    async def start(
        mode: str,
        *,
        servers: str = "oslo1",
        allowed_exmods: str = "",
        url: str | None = None,
        rabbit_opts: Mapping[str, object] | None = None,
    ) -> PeerProcess:
        options = [f"--rabbit-opt={k}={v}" for k, v in (rabbit_opts or {}).items()]
        argv = [
            sys.executable,
            str(OSLO_PEER),
            mode,
            *options,
            "--url",
            url or amqp_url,
            "--exchange",
            control_exchange,
            "--topic",
            topic,
            "--servers",
            servers,
            "--allowed-exmods",
            allowed_exmods,
            "--max-seconds",
            "120",
        ]
        peer = PeerProcess(argv, name=f"oslo-{mode}")
        peers.append(peer)
        await peer.start()
        await peer.wait_event(lambda e: e.get("event") == "ready", within=30)
        return peer

    try:
        yield start
    finally:
        for peer in peers:
            await peer.__aexit__(None, None, None)


@pytest.fixture(autouse=True)
async def delete_test_queues(
    amqp_url: str, control_exchange: str, topic: str
) -> AsyncIterator[list[str]]:
    """Delete the (non auto-delete) queues and the exchange this test created on the broker.

    Tests append extra queue names to the yielded list; ``<topic>`` is always included.
    """
    names = [topic]
    yield names
    connection = await aio_pika.connect(amqp_url.replace("rabbit://", "amqp://", 1), timeout=10)
    async with connection:
        for name in names:
            channel = await connection.channel()
            # A queue that was never declared (a test that failed early) closes the channel.
            with contextlib.suppress(aiormq.exceptions.AMQPError):
                await channel.queue_delete(name)
        channel = await connection.channel()
        with contextlib.suppress(aiormq.exceptions.AMQPError):
            await channel.exchange_delete(control_exchange)
