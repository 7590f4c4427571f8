"""A nacked publish on a broker cluster: retried on a new publisher channel for a short window
(a quorum queue nacks a channel that first published to it while its leader's node had just
died, see tests/faults/test_rabbit_cluster.py), final after it; immediate with one host."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest

from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import MessageRejected, get_transport
from shared_objects.runtime.messaging.rabbit import _NACK_RETRY_WINDOW, RabbitDriver
from shared_objects.runtime.messaging.topology import DEFAULT_EXCHANGE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
async def full_queue(amqp_url: str) -> AsyncIterator[str]:
    """A queue that holds one message and refuses the next (overflow=reject-publish)."""
    name = f"full-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(amqp_url.replace("rabbit://", "amqp://"), timeout=5)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            name, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        try:
            yield name
        finally:
            await queue.delete(if_unused=False, if_empty=False)


def _twice(url: str) -> str:
    """The same broker listed as two hosts: the driver then behaves as on a cluster."""
    scheme, _, rest = url.partition("://")
    netloc, _, vhost = rest.partition("/")
    return f"{scheme}://{netloc},{netloc}/{vhost}"


@pytest.mark.parametrize("hosts", [1, 2])
async def test_a_full_queue_is_refused_after_the_cluster_retry_window(
    amqp_url: str, full_queue: str, hosts: int
) -> None:
    url = amqp_url if hosts == 1 else _twice(amqp_url)
    async with get_transport(MessagingConfig(transport_url=url)) as transport:
        driver = transport.driver
        assert isinstance(driver, RabbitDriver)
        await driver.publish(DEFAULT_EXCHANGE, full_queue, b"first")
        publisher = driver._publisher
        started = time.monotonic()
        with pytest.raises(MessageRejected, match="queue full"):
            await driver.publish(DEFAULT_EXCHANGE, full_queue, b"second")
        took = time.monotonic() - started
        renewed = driver._publisher is not publisher
        assert driver.stats()["rejected"] == 1
    if hosts == 1:
        assert took < 1.0
        assert not renewed
    else:
        # Retried on new channels for the window, then final (never until the deadline).
        assert renewed
        assert _NACK_RETRY_WINDOW <= took < _NACK_RETRY_WINDOW + 2.0
