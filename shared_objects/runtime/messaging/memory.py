"""An in-process broker with RabbitMQ's semantics, for fast unit tests only.

Emulates what the RPC runtime relies on: topic, fanout and default exchanges, queues bound by
routing key, declaration equivalence (406-style error on a mismatch), per-message expiration,
prefetch windows, acks, the publisher's ``user_id``, and exclusive queues (each ``MemoryDriver``
plays one connection: another one declaring, consuming or deleting an exclusive queue gets
``RESOURCE_LOCKED``; closing the owner deletes it). A lost and restored connection can be
simulated (``MemoryDriver.simulate_connection_loss`` / ``simulate_reconnect``). Not emulated:
``x-expires``, durability beyond that, permissions. Transports built from the same
``memory://<name>`` URL share one broker, so a client transport and a server transport talk to
each other like two processes on one RabbitMQ.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import itertools
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import structlog

from shared_objects.runtime.messaging.driver import Delivery, DeliveryCallback, Driver, Subscription
from shared_objects.runtime.messaging.exceptions import (
    MessageDeliveryFailure,
    MessageUndeliverable,
    MessagingError,
)
from shared_objects.runtime.messaging.topology import ExchangeSpec, QueueSpec

log = structlog.get_logger(__name__)


@dataclasses.dataclass(slots=True)
class _Message:
    body: bytes
    user_id: str | None
    expires_at: float | None


async def _run(awaitable: Awaitable[None]) -> None:
    await awaitable


class _Consumer:
    def __init__(self, queue: _Queue, callback: DeliveryCallback, prefetch: int, no_ack: bool):
        self.queue = queue
        self.callback = callback
        self.prefetch = prefetch
        self.no_ack = no_ack
        self.pending: dict[int, _Message] = {}  # delivered, not acked yet
        self.active = True
        # Deliveries run in the subscriber's context, as in a process of its own on RabbitMQ
        # (the consumer's connection reader runs there), never in the publisher's.
        self.context = contextvars.copy_context()

    @property
    def unacked(self) -> int:
        return len(self.pending)

    def has_room(self) -> bool:
        return self.active and (self.no_ack or self.prefetch <= 0 or self.unacked < self.prefetch)


class _Queue:
    def __init__(self, spec: QueueSpec, owner: object | None):
        self.spec = spec
        # The connection (driver) an exclusive queue belongs to.
        self.owner = owner if spec.exclusive else None
        self.messages: collections.deque[_Message] = collections.deque()
        self.consumers: list[_Consumer] = []
        self._rr = itertools.count()
        self.unacked = 0


class MemoryBroker:
    """The shared state of a ``memory://`` broker: exchanges, bindings and queues."""

    def __init__(self) -> None:
        self.exchanges: dict[str, ExchangeSpec] = {}
        self.bindings: dict[str, set[tuple[str, str]]] = collections.defaultdict(set)
        self.queues: dict[str, _Queue] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self._tags = itertools.count(1)

    def declare_exchange(self, spec: ExchangeSpec) -> None:
        if not spec.name:
            return
        existing = self.exchanges.get(spec.name)
        if existing is not None and existing != spec:
            raise MessagingError(
                f"PRECONDITION_FAILED - inequivalent exchange {spec} vs {existing}"
            )
        self.exchanges[spec.name] = spec

    def _check_owner(self, queue: _Queue, owner: object | None) -> None:
        if queue.owner is not None and queue.owner is not owner:
            raise MessagingError(
                "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue "
                f"{queue.spec.name!r}"
            )

    def declare_queue(self, spec: QueueSpec, owner: object | None = None) -> _Queue:
        """Declare ``spec`` for the connection ``owner`` (which an exclusive queue belongs to)."""
        queue = self.queues.get(spec.name)
        if queue is None:
            queue = self.queues[spec.name] = _Queue(spec, owner)
        else:
            self._check_owner(queue, owner)
            if (
                queue.spec.durable,
                queue.spec.auto_delete,
                queue.spec.exclusive,
                queue.spec.arguments_dict,
            ) != (spec.durable, spec.auto_delete, spec.exclusive, spec.arguments_dict):
                raise MessagingError(f"PRECONDITION_FAILED - inequivalent queue {spec.name}")
        if spec.exchange is not None and spec.exchange.name:
            self.declare_exchange(spec.exchange)
            self.bindings[spec.exchange.name].add((spec.routing_key, spec.name))
        return queue

    def delete_queue(self, name: str, owner: object | None = None) -> None:
        queue = self.queues.get(name)
        if queue is None:
            return
        self._check_owner(queue, owner)
        del self.queues[name]
        for consumer in queue.consumers:
            consumer.active = False
        for exchange_name, bound in list(self.bindings.items()):
            bound.difference_update({b for b in bound if b[1] == name})
            spec = self.exchanges.get(exchange_name)
            if not bound and spec is not None and spec.auto_delete:
                del self.exchanges[exchange_name]
                del self.bindings[exchange_name]

    def route(self, exchange: str, routing_key: str) -> list[_Queue]:
        if not exchange:
            queue = self.queues.get(routing_key)
            return [queue] if queue is not None else []
        spec = self.exchanges.get(exchange)
        if spec is None:
            raise MessageDeliveryFailure(f"NOT_FOUND - no exchange {exchange!r}")
        names = {
            q
            for key, q in self.bindings.get(exchange, ())
            if spec.type == "fanout" or key == routing_key
        }
        return [self.queues[n] for n in sorted(names) if n in self.queues]

    def publish(self, exchange: str, routing_key: str, message: _Message) -> int:
        queues = self.route(exchange, routing_key)
        for queue in queues:
            queue.messages.append(message)
            self.pump(queue)
        return len(queues)

    def pump(self, queue: _Queue) -> None:
        """Hand queued messages to consumers with room in their prefetch window."""
        while queue.messages:
            consumers = [c for c in queue.consumers if c.has_room()]
            if not consumers:
                return
            consumer = consumers[next(queue._rr) % len(consumers)]
            message = queue.messages.popleft()
            if message.expires_at is not None and time.monotonic() > message.expires_at:
                continue  # expired in the queue: the broker drops it
            ack = None
            if not consumer.no_ack:
                tag = next(self._tags)
                consumer.pending[tag] = message
                queue.unacked += 1
                ack = self._make_ack(queue, consumer, tag)
            delivery = Delivery(message.body, message.user_id, ack, queue.spec.name)
            task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
                _run(consumer.callback(delivery)), context=consumer.context.copy()
            )
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _make_ack(self, queue: _Queue, consumer: _Consumer, tag: int) -> Any:
        async def ack() -> None:
            if consumer.pending.pop(tag, None) is None:
                raise MessageDeliveryFailure("ack after the channel closed (message requeued)")
            queue.unacked -= 1
            self.pump(queue)

        return ack

    def requeue_unacked(self, consumer: _Consumer) -> None:
        """What closing a channel does: its unacked messages go back to the queue's head."""
        queue = consumer.queue
        for tag in sorted(consumer.pending, reverse=True):
            queue.messages.appendleft(consumer.pending.pop(tag))
            queue.unacked -= 1
        self.pump(queue)

    def _task_done(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("memory_consumer_failed", exc_info=task.exception())

    def close_connection(self, owner: object) -> None:
        """What closing a connection does to the exclusive queues it declared: deletes them."""
        for name in [n for n, q in self.queues.items() if q.owner is owner]:
            self.delete_queue(name, owner)

    def message_count(self, name: str) -> tuple[int, int]:
        """(ready, unacknowledged) for a queue, like ``rabbitmqctl list_queues``."""
        queue = self.queues[name]
        return len(queue.messages), queue.unacked


_BROKERS: dict[str, MemoryBroker] = {}


def broker_for(name: str) -> MemoryBroker:
    """The broker behind ``memory://<name>`` (created on first use, shared afterwards)."""
    broker = _BROKERS.get(name)
    if broker is None:
        broker = _BROKERS[name] = MemoryBroker()
    return broker


class _MemorySubscription(Subscription):
    def __init__(self, broker: MemoryBroker, consumers: list[_Consumer], on_close: Any):
        self._broker = broker
        self._consumers = consumers
        self._on_close = on_close
        self.cancelled = False

    def drop(self, owner: object) -> None:
        """The connection is gone: consumers stop; a queue that is not durable goes with its
        messages (as on a broker restart), so what is sent to it meanwhile is unroutable."""
        for consumer in self._consumers:
            consumer.active = False
            if consumer.queue.spec.durable:
                self._broker.requeue_unacked(consumer)
            else:
                consumer.pending.clear()  # unacked messages: gone with their queue
                self._broker.delete_queue(consumer.queue.spec.name, owner)

    def restore(self, owner: object) -> None:
        """Declare the queues again and consume from them on the restored connection."""
        restored = []
        for old in self._consumers:
            queue = self._broker.declare_queue(old.queue.spec, owner)
            if old in queue.consumers:
                queue.consumers.remove(old)
            consumer = _Consumer(queue, old.callback, old.prefetch, old.no_ack)
            consumer.context = old.context
            queue.consumers.append(consumer)
            restored.append(consumer)
        self._consumers = restored
        for consumer in restored:
            self._broker.pump(consumer.queue)

    async def cancel(self) -> None:
        self.cancelled = True
        self._on_close(self)
        for consumer in self._consumers:
            consumer.active = False
            if consumer in consumer.queue.consumers:
                consumer.queue.consumers.remove(consumer)
            # Unacked messages of a cancelled consumer stay unacked until acked, like AMQP.

    async def close(self) -> None:
        await self.cancel()
        for consumer in self._consumers:
            self._broker.requeue_unacked(consumer)


class MemoryDriver(Driver):
    """``Driver`` over a ``MemoryBroker``; ``user_id`` emulates the broker login."""

    def __init__(self, broker: MemoryBroker, user_id: str = "guest"):
        super().__init__()
        self.broker = broker
        self.user_id = user_id
        self._published = 0
        self._returned = 0
        self._reconnects = 0
        self._subscriptions: list[_MemorySubscription] = []
        #: False between ``simulate_connection_loss`` and ``simulate_reconnect``.
        self.link_up = True

    @property
    def connected(self) -> bool:
        return self.link_up

    def simulate_connection_loss(self) -> None:
        """What a broker restart does to this connection (for tests): its consumers stop, the
        non-durable queues it consumes from are deleted with their messages (casts to them are
        unroutable until ``simulate_reconnect``), and its own publishes fail."""
        self.link_up = False
        for subscription in self._subscriptions:
            subscription.drop(self)

    async def simulate_reconnect(self) -> None:
        """The connection is back: queues declared again, consumers restored, then the
        ``on_reconnect`` callbacks run (as the aio-pika driver does)."""
        self.link_up = True
        self._reconnects += 1
        for subscription in self._subscriptions:
            subscription.restore(self)
        self._notify_reconnected()

    def _forget(self, subscription: _MemorySubscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        self.broker.close_connection(self)

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
        if not self.link_up:
            raise MessageDeliveryFailure("connection to the broker lost (simulated)")
        self.broker.declare_exchange(exchange)
        expires_at = time.monotonic() + expiration if expiration is not None else None
        # An empty login publishes without user_id (like an oslo.messaging peer).
        routed = self.broker.publish(
            exchange.name, routing_key, _Message(bytes(body), self.user_id or None, expires_at)
        )
        self._published += 1
        if mandatory and not routed:
            self._returned += 1
            raise MessageUndeliverable(
                f"NO_ROUTE: message to {exchange.name!r}/{routing_key!r} was returned"
            )

    async def declare(self, queues: Sequence[QueueSpec]) -> None:
        for spec in queues:
            self.broker.declare_queue(spec, self)

    async def subscribe(
        self,
        queues: Sequence[QueueSpec],
        callback: DeliveryCallback,
        *,
        prefetch: int = 0,
        no_ack: bool = False,
    ) -> Subscription:
        # Declare everything first: a refused declaration leaves no consumer behind.
        declared = [self.broker.declare_queue(spec, self) for spec in queues]
        consumers = []
        for queue in declared:
            consumer = _Consumer(queue, callback, prefetch, no_ack)
            queue.consumers.append(consumer)
            consumers.append(consumer)
        for consumer in consumers:
            self.broker.pump(consumer.queue)
        subscription = _MemorySubscription(self.broker, consumers, self._forget)
        self._subscriptions.append(subscription)
        return subscription

    async def delete_queue(self, name: str) -> None:
        self.broker.delete_queue(name, self)

    def stats(self) -> dict[str, Any]:
        return {
            "reconnects": self._reconnects,
            "published": self._published,
            "publish_failures": self._returned,
            "returned": self._returned,
        }
