"""Helpers for tests that run against a real RabbitMQ: inspect and clean up what a test made.

Kept in the package (like ``structlog.testing``) so every team's tests use the same tools. Only
touch names your test created: the broker is shared.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterable
from urllib.parse import quote

import aio_pika
import aiormq

from shared_objects.runtime.messaging.urls import parse_transport_url


async def _channel(
    transport_url: str,
) -> tuple[aio_pika.abc.AbstractConnection, aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(parse_transport_url(transport_url).hosts[0])
    return connection, await connection.channel()


def vhost_of(transport_url: str) -> str:
    """The virtual host a transport URL names (``/`` when it names none)."""
    return parse_transport_url(transport_url).virtual_host


def vhost_path(transport_url: str) -> str:
    """The vhost part to append to another ``scheme://user:pw@host:port/`` URL."""
    vhost = vhost_of(transport_url)
    return "" if vhost == "/" else quote(vhost, safe="")


async def ready_count(transport_url: str, queue: str) -> int | None:
    """Messages ready in ``queue`` (passive declare), or ``None`` if the queue does not exist."""
    connection, channel = await _channel(transport_url)
    try:
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        return int(count or 0)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    finally:
        await connection.close()


async def queue_counts_ctl(queue: str, vhost: str = "/") -> tuple[int, int] | None:
    """(ready, unacknowledged) for ``queue`` from ``rabbitmqctl`` (local node), ``None`` if the
    queue is not listed or rabbitmqctl is unavailable."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return None
    proc = await asyncio.create_subprocess_exec(
        ctl,
        "list_queues",
        "-q",
        "-p",
        vhost,
        "name",
        "messages_ready",
        "messages_unacknowledged",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    for line in out.decode().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == queue:
            return int(parts[1]), int(parts[2])
    return None


async def delete_entities(
    transport_url: str, *, queues: Iterable[str] = (), exchanges: Iterable[str] = ()
) -> None:
    """Delete queues and exchanges a test created (missing ones are ignored)."""
    connection, channel = await _channel(transport_url)
    try:
        for name in queues:
            await channel.queue_delete(name)
        for name in exchanges:
            await channel.exchange_delete(name)
    finally:
        await connection.close()


class BrokerJanitor:
    """Remembers the queues and exchanges a test creates and deletes them afterwards."""

    def __init__(self, transport_url: str):
        self.transport_url = transport_url
        self.queues: set[str] = set()
        self.exchanges: set[str] = set()

    def server_topology(self, control_exchange: str, topic: str, *servers: str) -> None:
        """Record what RPCServers on ``topic`` declare (fanout queues delete themselves)."""
        self.exchanges.add(control_exchange)
        self.queues.add(topic)
        self.queues.update(f"{topic}.{server}" for server in servers)

    async def cleanup(self) -> None:
        await delete_entities(self.transport_url, queues=self.queues, exchanges=self.exchanges)
