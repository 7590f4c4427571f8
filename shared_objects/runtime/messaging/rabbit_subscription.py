"""One subscription of the aio-pika driver (``rabbit.py``): a channel of its own, its own prefetch.

Exclusive queues (the reply queue) are declared by Fleet itself, on a short-lived channel, and
re-declared after a reconnect by the subscription, not by aio-pika: until the broker has noticed
that our previous connection is dead it still owns the queue and refuses the declaration
(``RESOURCE_LOCKED``). On aio-pika's restore path that refusal would fail the whole reconnect
(publishing and every server included); here only that queue waits, retried every second in the
background until the broker lets the old connection go.

Consumers are restored after every reconnect by a task per queue, never inside aio-pika's reopen
callback: that callback runs while aio-pika holds the channel's restore lock, and if the
connection drops again while it awaits the broker, aio-pika marks the channel restored on the
dead connection and never reopens it (the queue would stay without a consumer for good). The
task waits until the channel is ready on the new connection, declares what is ours (exclusive
queues) and consumes; any failure, including a further drop, just means another attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
import aiormq.abc
import structlog
from aio_pika.abc import AbstractRobustChannel

from shared_objects.runtime.messaging.driver import Delivery, DeliveryCallback, Subscription
from shared_objects.runtime.messaging.exceptions import MessageDeliveryFailure
from shared_objects.runtime.messaging.topology import QueueSpec

log = structlog.get_logger(__name__)


# Teardown talks to the broker only while connected, and never for longer than this: stopping a
# server or closing a transport must not wait for a broker that is gone.
_TEARDOWN_TIMEOUT = 5.0
_TEARDOWN_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError, TimeoutError)
# Errors after which restoring a consumer is retried in the background.
_RECOVERABLE = (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError, TimeoutError)
# Refusals that describe the declaration itself (not a broker that is away): never retried.
_REFUSALS = (
    aiormq.exceptions.ChannelPreconditionFailed,
    aiormq.exceptions.ChannelAccessRefused,
    aiormq.exceptions.ChannelNotFoundEntity,
    aiormq.exceptions.ChannelLockedResource,
)
_RECOVERY_PAUSE = 1.0
# A publisher channel replaced after a basic.nack is closed this much later: confirms of
# publishes still in flight on it arrive first.
_STALE_CHANNEL_GRACE = 10.0


# A shared queue that cannot be re-declared for this many attempts is given up on (an exclusive
# queue never is: the broker frees it once it drops our previous connection).
_RECOVERY_ATTEMPTS = 30


def _is_up(channel: AbstractRobustChannel) -> bool:
    connection = getattr(channel, "_connection", None)
    connected = getattr(connection, "connected", None)
    return not channel.is_closed and (connected is None or connected.is_set())


class RabbitSubscription(Subscription):
    """Consumers on a dedicated robust channel.

    Queues and bindings are declared through aio-pika (which re-declares them after a reconnect);
    consuming goes straight to aiormq's ``basic_consume``, skipping aio-pika's per-message wrapper
    object and extra task, and is re-issued from the channel's reopen callback.
    """

    def __init__(
        self,
        channel: AbstractRobustChannel,
        callback: DeliveryCallback,
        no_ack: bool,
        declare: Callable[[AbstractRobustChannel, QueueSpec], Awaitable[Any]],
        on_queue_restored: Callable[[], None] = lambda: None,
    ):
        self._channel = channel
        self._callback = callback
        self._no_ack = no_ack
        self._declare = declare
        # A queue the broker deleted under us is back: what was sent to it meanwhile is lost,
        # as after a reconnect (the driver tells its reconnect listeners).
        self._on_queue_restored = on_queue_restored
        self.specs: dict[str, QueueSpec] = {}
        # queue -> (underlay channel, consumer tag) of its consumer
        self._tags: dict[str, tuple[aiormq.abc.AbstractChannel, str]] = {}
        self._cancelled = False
        self._recovery: dict[str, asyncio.Task[None]] = {}
        # Shared queues the broker deleted under us: declared again before consuming.
        self._redeclare: set[str] = set()
        # Handlers of delivered messages, detached from the channel (see _on_message).
        self._handlers: set[asyncio.Future[None]] = set()
        channel.reopen_callbacks.add(self._on_reopen)

    @property
    def queues(self) -> list[str]:
        return list(self.specs)

    def _is_consuming(self, queue: str) -> bool:
        entry = self._tags.get(queue)
        return entry is not None and not entry[0].is_closed

    async def _consume(self, queue: str) -> None:
        underlay = await self._channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
        ok = await underlay.basic_consume(queue, self._on_message(queue), no_ack=self._no_ack)
        assert ok.consumer_tag is not None
        self._tags[queue] = (underlay, ok.consumer_tag)

    async def add(self, spec: QueueSpec) -> None:
        self.specs[spec.name] = spec
        await self._consume(spec.name)

    def _on_broker_cancel(self, frame: Any) -> None:
        # The broker cancels a consumer when its queue disappears (deleted, node lost): declare
        # the queue again and resume consuming, in the background (we are in the channel reader).
        tag = getattr(frame, "consumer_tag", None)
        queue = next((q for q, (_, t) in self._tags.items() if t == tag), None)
        if queue is None or self._cancelled:
            return  # our own cancel (CancelOk) or a consumer we no longer track
        del self._tags[queue]
        log.warning("consumer_cancelled_by_broker", queue=queue)
        self._redeclare.add(queue)
        self._start_recovery(queue)

    def _start_recovery(self, queue: str) -> None:
        existing = self._recovery.get(queue)
        if (existing is not None and not existing.done()) or self._cancelled:
            return  # already being recovered: that task loops until the queue is consumed
        task = asyncio.ensure_future(self._recover(queue))
        self._recovery[queue] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._recovery.get(queue) is done:
                del self._recovery[queue]

        task.add_done_callback(forget)

    async def _recover(self, queue: str) -> None:
        spec = self.specs[queue]
        attempt = 0
        # Re-checked after every attempt: a consume that succeeded on a channel that has
        # closed since (another drop) does not count.
        while not self._cancelled and not self._is_consuming(queue):
            attempt += 1
            try:
                # Until aio-pika has reopened the channel on a live connection (and restored
                # its queues and bindings) there is nothing to consume on.
                await self._channel.ready()
                if spec.exclusive or queue in self._redeclare:
                    # Exclusive queues are ours to declare; a shared one only after the broker
                    # deleted it (aio-pika restores the rest, and would register a duplicate).
                    await self._declare(self._channel, spec)
                    if queue in self._redeclare:
                        self._redeclare.discard(queue)
                        self._on_queue_restored()
                if not self._is_consuming(queue):
                    await self._consume(queue)
                log.info("consumer_recovered", queue=queue, attempt=attempt)
                continue
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._cancelled or task is None or task.cancelling():
                    raise  # stopped by us
                # aiormq cancels what waits on a connection that died: another attempt.
                error: BaseException = ConnectionError("connection lost during recovery")
            except _RECOVERABLE as exc:
                error = exc
            if attempt == 1 or attempt % 10 == 0:
                log.warning(
                    "consumer_recovery_failed", queue=queue, attempt=attempt, error=repr(error)
                )
            if not spec.exclusive and attempt >= _RECOVERY_ATTEMPTS:
                log.error("consumer_recovery_gave_up", queue=queue)
                return
            await asyncio.sleep(_RECOVERY_PAUSE)

    async def _on_reopen(self, *_: Any) -> None:
        # A new underlay channel. Only schedule here (see the module docstring): each queue's
        # recovery task waits for the channel to be ready, then declares and consumes.
        self._tags.clear()
        if self._cancelled:
            return
        for queue in self.specs:
            self._start_recovery(queue)
        log.info("consumers_restoring", queues=self.queues)

    def _on_message(self, queue: str) -> Any:
        callback = self._callback
        no_ack = self._no_ack

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            ack = None
            if not no_ack:
                channel = message.channel
                tag = message.delivery_tag
                assert tag is not None

                async def ack() -> None:
                    # Don't wait for the frame to hit the socket: ordering on the channel is kept.
                    try:
                        await channel.basic_ack(tag, wait=False)
                    except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
                        raise MessageDeliveryFailure(f"ack failed: {exc!r}") from exc

            delivery = Delivery(message.body, message.header.properties.user_id, ack, queue)
            # aiormq runs this callback as a task of the channel and cancels every such task
            # when the channel closes (a broker restart, a lost connection): a handler half-way
            # through a build would vanish without a trace. The work runs in a task of its own
            # instead, kept alive by this subscription, whatever happens to the channel.
            task: asyncio.Future[None] = asyncio.ensure_future(callback(delivery))
            handlers.add(task)
            task.add_done_callback(_handler_done)

        handlers = self._handlers

        def _handler_done(task: asyncio.Future[None]) -> None:
            handlers.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("delivery_handler_failed", queue=queue, error=repr(task.exception()))

        return on_message

    async def cancel(self) -> None:
        self._cancelled = True
        for task in list(self._recovery.values()):
            task.cancel()
        tags, self._tags = self._tags, {}
        if not tags or not _is_up(self._channel):
            return  # no connection: the broker forgets our consumers by itself
        try:
            async with asyncio.timeout(_TEARDOWN_TIMEOUT):
                underlay = await self._channel.get_underlay_channel()
                for consumer_channel, tag in tags.values():
                    if consumer_channel is underlay:
                        await underlay.basic_cancel(tag)
        except _TEARDOWN_ERRORS as exc:
            log.warning("consumer_cancel_failed", queues=list(tags), error=repr(exc))

    async def close(self) -> None:
        await self.cancel()
        self._channel.reopen_callbacks.discard(self._on_reopen)
        if not self._channel.is_closed:
            try:
                async with asyncio.timeout(_TEARDOWN_TIMEOUT):
                    await self._channel.close()
            except _TEARDOWN_ERRORS as exc:
                log.warning("channel_close_failed", error=repr(exc))
