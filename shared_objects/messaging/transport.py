"""The transport: one broker connection per process, shared by clients, servers and notifiers."""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import structlog

from shared_objects.config import MessagingConfig
from shared_objects.messaging.codec import ALWAYS_ALLOWED_EXMODS
from shared_objects.messaging.driver import Driver
from shared_objects.messaging.exceptions import MessagingError
from shared_objects.messaging.memory import MemoryBroker, MemoryDriver, broker_for
from shared_objects.messaging.replies import ReplyWaiter
from shared_objects.messaging.topology import Topology
from shared_objects.messaging.urls import parse_transport_url

log = structlog.get_logger(__name__)


class Transport:
    """A connected (or connectable) broker plus the options every peer on it shares.

    Use ``async with transport:`` (or ``connect()``/``close()``). ``pending_replies`` counts the
    calls waiting for a reply across every client of this transport.
    """

    def __init__(
        self,
        config: MessagingConfig,
        driver: Driver,
        *,
        allowed_remote_exmods: Iterable[str] = (),
    ):
        self.config = config
        self.driver = driver
        self.topology = Topology(config)
        self.allowed_remote_exmods = frozenset(allowed_remote_exmods) | ALWAYS_ALLOWED_EXMODS
        # Named after the login (the driver knows it before connecting: it is in the URL).
        self.replies = ReplyWaiter(driver, self.topology.reply_queue(driver.user_id))
        self._connected = False

    @property
    def control_exchange(self) -> str:
        return self.config.control_exchange

    @property
    def user_id(self) -> str:
        """The broker login: the AMQP ``user_id`` set on everything this transport publishes."""
        return self.driver.user_id

    @property
    def pending_replies(self) -> int:
        """Calls waiting for a reply right now (back to 0 when no call is in flight)."""
        return self.replies.pending

    async def connect(self) -> None:
        if not self._connected:
            await self.driver.connect()
            self._connected = True

    async def close(self) -> None:
        if self._connected:
            self._connected = False
            await self.replies.close()
            await self.driver.close()

    async def __aenter__(self) -> Transport:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def stats(self) -> dict[str, Any]:
        """Driver counters (reconnects, published, ...) plus reply-side counters
        (``forged_replies``: replies and heartbeats refused because they came from a login the
        call did not expect)."""
        return {
            **self.driver.stats(),
            "pending_replies": self.replies.pending,
            "late_replies": self.replies.late_replies,
            "malformed_replies": self.replies.malformed_replies,
            "forged_replies": self.replies.forged_replies,
        }


def get_transport(
    messaging_config: MessagingConfig,
    allowed_remote_exmods: Iterable[str] | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
    memory_broker: MemoryBroker | None = None,
    connect_timeout: float = 15.0,
    reconnect_interval: float = 1.0,
) -> Transport:
    """A transport for ``messaging_config.transport_url`` (not connected yet).

    ``rabbit://`` / ``amqp://`` / ``amqps://`` give the aio-pika driver (several comma-separated
    hosts fail over; ``amqps://`` or ``?ssl=1`` use TLS, with ``ssl_context`` or the URL's
    ``cafile``/``certfile``/``keyfile`` options). ``memory://[user@]name`` gives the in-process
    driver; transports naming the same broker share it (or pass ``memory_broker``).
    ``allowed_remote_exmods`` lists modules whose exceptions a caller may re-raise as themselves.
    """
    parsed = parse_transport_url(
        messaging_config.transport_url, heartbeat=messaging_config.heartbeat
    )
    driver: Driver
    if parsed.scheme == "memory":
        broker = memory_broker if memory_broker is not None else broker_for(parsed.hosts[0])
        driver = MemoryDriver(broker, user_id=parsed.users[0] or "guest")
    else:
        from shared_objects.messaging.rabbit import RabbitDriver

        if messaging_config.rabbit_quorum_queue and messaging_config.amqp_auto_delete:
            raise MessagingError("rabbit_quorum_queue cannot be combined with amqp_auto_delete")
        driver = RabbitDriver(
            parsed,
            publisher_confirms=messaging_config.publisher_confirms,
            ssl_context=ssl_context,
            connect_timeout=connect_timeout,
            reconnect_interval=reconnect_interval,
            publish_timeout=messaging_config.rpc_response_timeout,
        )
    return Transport(messaging_config, driver, allowed_remote_exmods=allowed_remote_exmods or ())
