"""The private RabbitMQ node for broker fault tests: isolated, restartable, cleaned up."""

from __future__ import annotations

import asyncio
import os

import aio_pika
import pytest

from shared_objects.testing import RabbitNode, eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def _publish_and_get(url: str, queue_name: str) -> bytes:
    connection = await aio_pika.connect(url.replace("rabbit://", "amqp://"), timeout=5)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, auto_delete=True)
        await channel.default_exchange.publish(aio_pika.Message(b"hello"), routing_key=queue_name)
        message = await eventually(lambda: queue.get(fail=False), 2.5, what="the message")
        await message.ack()
        return message.body


async def test_private_node_serves_restarts_and_leaves_nothing_behind() -> None:
    node = RabbitNode()
    async with node:
        assert node.port != 5672
        assert node.last_start_seconds is not None and node.last_start_seconds < 60
        assert await _publish_and_get(node.url, "probe") == b"hello"

        await node.stop_app()
        with pytest.raises((ConnectionError, OSError, asyncio.TimeoutError)):
            await aio_pika.connect(node.url.replace("rabbit://", "amqp://"), timeout=2)
        await node.start_app()
        assert await _publish_and_get(node.url, "probe") == b"hello"

        base = node.base_dir
        pid = node.pid
    assert not base.exists()
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_killed_node_refuses_connections_and_is_still_cleaned_up() -> None:
    node = RabbitNode()
    async with node:
        await node.kill()
        with pytest.raises((ConnectionError, OSError)):
            await aio_pika.connect(node.url.replace("rabbit://", "amqp://"), timeout=2)
        base = node.base_dir
    assert not base.exists()
