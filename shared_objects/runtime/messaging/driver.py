"""The broker interface the RPC client, server and notifier are written against.

Two implementations: ``rabbit.RabbitDriver`` (aio-pika, production) and ``memory.MemoryDriver``
(in-process, for fast unit tests). Both honour the same semantics: topic/fanout/default exchanges,
queues bound by exact routing key, per-message expiration, publisher-side ``user_id``, acks.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog

from shared_objects.runtime.messaging.topology import ExchangeSpec, QueueSpec

log = structlog.get_logger(__name__)

#: Told that the connection came back after a loss (no arguments; must not block).
ReconnectCallback = Callable[[], None]


class Delivery:
    """One received message: its body, the broker-validated ``user_id``, and how to ack it."""

    __slots__ = ("_ack", "body", "queue", "user_id")

    def __init__(
        self,
        body: bytes,
        user_id: str | None,
        ack: Callable[[], Awaitable[None]] | None,
        queue: str = "",
    ):
        self.body = body
        self.user_id = user_id
        self.queue = queue
        self._ack = ack

    async def ack(self) -> None:
        """Acknowledge once; later calls (and no-ack subscriptions) do nothing."""
        ack, self._ack = self._ack, None
        if ack is not None:
            await ack()


DeliveryCallback = Callable[[Delivery], Awaitable[None]]


class Subscription(abc.ABC):
    """Consumers on one or more queues, sharing one prefetch window."""

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Stop receiving new messages; messages already handed over are unaffected."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Cancel and release the underlying channel."""


class Driver(abc.ABC):
    """Publish, declare and consume on one broker connection."""

    #: Login user, set as the AMQP ``user_id`` of every published message.
    user_id: str

    def __init__(self) -> None:
        self._reconnect_callbacks: list[ReconnectCallback] = []

    def on_reconnect(self, callback: ReconnectCallback) -> Callable[[], None]:
        """Call ``callback`` after every reconnect (not the first connect), and after a queue
        this connection consumes from was deleted under it and declared again; returns a
        function that removes it.

        Runs once queues, exchanges and bindings are declared again (consumers may still be
        coming back): a message published to a server's queue after that is kept. What was sent
        while the link was down may be lost (a broker restart empties non-durable queues, a
        server-addressed cast to a missing queue is returned), so this is where a service
        re-reads state it keeps in step by casts. ``callback`` must not block: schedule work.
        """
        self._reconnect_callbacks.append(callback)

        def remove() -> None:
            if callback in self._reconnect_callbacks:
                self._reconnect_callbacks.remove(callback)

        return remove

    @property
    def connected(self) -> bool:
        """True while the broker link is up (between a loss and the reconnect: False). Cheap
        (no broker round trip): ``/readyz`` asks it on every probe."""
        return True

    def _notify_reconnected(self) -> None:
        for callback in list(self._reconnect_callbacks):
            try:
                callback()
            except Exception:  # one faulty listener must not break the reconnect of the rest
                log.exception("reconnect_callback_failed", callback=repr(callback))

    @abc.abstractmethod
    async def connect(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def publish(
        self,
        exchange: ExchangeSpec,
        routing_key: str,
        body: bytes,
        *,
        expiration: float | None = None,
        mandatory: bool = False,
        retry_for: float | None = None,
    ) -> None:
        """Publish ``body`` (JSON), declaring ``exchange`` first if this driver has not yet.

        ``expiration`` is seconds (sent as milliseconds); ``mandatory`` raises
        ``MessageDeliveryFailure`` when no queue receives the message; ``retry_for`` bounds
        waiting (seconds) for a lost connection to come back. Failures raise
        ``MessageDeliveryFailure``.
        """

    @abc.abstractmethod
    async def declare(self, queues: Sequence[QueueSpec]) -> None:
        """Declare queues, their exchanges and bindings, without consuming."""

    @abc.abstractmethod
    async def subscribe(
        self,
        queues: Sequence[QueueSpec],
        callback: DeliveryCallback,
        *,
        prefetch: int = 0,
        no_ack: bool = False,
    ) -> Subscription:
        """Declare ``queues`` (with exchanges and bindings) and consume from all of them.

        ``callback`` runs in its own task per message; it must ack (unless ``no_ack``).
        Consumers are restored after a reconnect.
        """

    @abc.abstractmethod
    async def delete_queue(self, name: str) -> None:
        """Delete a queue this process created (e.g. a server's fanout queue on stop)."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters: reconnects, published, publish_failures, returned."""
