"""The test kit's three-node RabbitMQ cluster: started in parallel, clustered, one node stopped
and started again with its data, and nothing left running afterwards — even when the start is
interrupted."""

from __future__ import annotations

import asyncio
import subprocess

import aio_pika
import pytest

from shared_objects.testing.rabbit_cluster import RabbitCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]


def _running(names: list[str]) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [name for name in names if name in out]


async def test_an_interrupted_start_leaves_nothing_running() -> None:
    cluster = RabbitCluster()
    with pytest.raises(TimeoutError):
        # Cancelled while the nodes boot (each takes seconds): the start must unwind itself.
        await asyncio.wait_for(cluster.start(), 3.0)
    assert _running(cluster.nodenames) == []
    assert all(node.pid is None for node in cluster.nodes)


async def test_a_stopped_node_restarts_with_its_data_and_rejoins() -> None:
    cluster = RabbitCluster()
    async with cluster:
        assert sorted(await cluster.running_nodes()) == sorted(cluster.nodenames)
        port = cluster.nodes[1].port
        url = f"amqp://guest:guest@127.0.0.1:{cluster.nodes[0].port}/"
        async with await aio_pika.connect(url, timeout=10) as connection:
            channel = await connection.channel(publisher_confirms=True)
            await channel.declare_queue("kept", durable=True, arguments={"x-queue-type": "quorum"})
            await channel.default_exchange.publish(aio_pika.Message(b"kept"), "kept")

        await cluster.shutdown(1)
        assert cluster.nodes[1].nodename not in await cluster.running_nodes()
        await cluster.restart(1)
        assert cluster.nodes[1].port == port
        assert cluster.nodes[1].nodename in await cluster.running_nodes()
        # The restarted node serves the replicated queue and its message.
        url = f"amqp://guest:guest@127.0.0.1:{port}/"
        async with await aio_pika.connect(url, timeout=10) as connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(
                "kept", durable=True, arguments={"x-queue-type": "quorum"}
            )
            message = await queue.get(timeout=10)
            assert message.body == b"kept"
            await message.ack()
        names = cluster.nodenames
    assert _running(names) == []
