"""The aio-pika driver: one robust connection per transport, shared by every client and server.

Channels: one publisher channel (publisher confirms, pipelined by concurrent publishers), one
channel per subscription (its own prefetch). aio-pika's robust connection and channels restore
exchanges, queues and bindings after a reconnect, Fleet re-issues its consumers; with several
hosts in the URL each connection attempt moves on to the next host (round robin, like oslo's
default strategy).

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
import os
import ssl
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

import aio_pika
import aiormq
import aiormq.abc
import structlog
from aio_pika.abc import AbstractRobustChannel, AbstractRobustQueue
from aio_pika.robust_connection import RobustConnection
from pamqp.commands import Basic

from shared_objects.messaging.connect_errors import describe_broker_failure
from shared_objects.messaging.driver import Delivery, DeliveryCallback, Driver, Subscription
from shared_objects.messaging.exceptions import (
    BrokerConnectFailed,
    MessageDeliveryFailure,
    MessageRejected,
    MessageUndeliverable,
    MessagingError,
)
from shared_objects.messaging.topology import ExchangeSpec, QueueSpec
from shared_objects.messaging.urls import ParsedURL

log = structlog.get_logger(__name__)

# Errors after which a publish is retried once the connection/channel is back.
_RETRYABLE = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    ConnectionError,
    RuntimeError,
)
_RETRY_PAUSE = 0.05
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
# On a cluster (several hosts in the URL) a nacked publish is retried, each time on a new
# publisher channel, for this long before the nack counts as "queue full" (see
# _publish_until_done); a quorum queue's new leader is known within it.
_NACK_RETRY_WINDOW = 3.0
_NACK_RETRY_PAUSE = 0.3
# A shared queue that cannot be re-declared for this many attempts is given up on (an exclusive
# queue never is: the broker frees it once it drops our previous connection).
_RECOVERY_ATTEMPTS = 30


def _is_up(channel: AbstractRobustChannel) -> bool:
    connection = getattr(channel, "_connection", None)
    connected = getattr(connection, "connected", None)
    return not channel.is_closed and (connected is None or connected.is_set())


class _FailoverRobustConnection(RobustConnection):
    """A robust connection that tries the next host of a multi-host URL on every attempt."""

    def __init__(self, urls: Sequence[str], **kwargs: Any):
        self._failover_urls = [aio_pika.connection.make_url(u) for u in urls]
        self._attempt = 0
        super().__init__(self._failover_urls[0], **kwargs)

    # aio-pika calls this (name-mangled private) method for every connection attempt.
    async def _RobustConnection__connect_transport(self) -> None:
        self.url = self._failover_urls[self._attempt % len(self._failover_urls)]
        self._attempt += 1
        await RobustConnection._RobustConnection__connect_transport(self)  # type: ignore[attr-defined]


class _RabbitSubscription(Subscription):
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


class RabbitDriver(Driver):
    """``Driver`` over aio-pika."""

    def __init__(
        self,
        url: ParsedURL,
        *,
        publisher_confirms: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = 15.0,
        reconnect_interval: float = 1.0,
        publish_timeout: float = 60.0,
    ):
        super().__init__()
        self._url = url
        self._publisher_confirms = publisher_confirms
        self._ssl_context = ssl_context
        self._connect_timeout = connect_timeout
        self._reconnect_interval = reconnect_interval
        self._publish_timeout = publish_timeout
        self._connection: _FailoverRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._renewing: asyncio.Lock | None = None
        self._stale_channels: set[asyncio.Task[None]] = set()
        self._declared: dict[ExchangeSpec, asyncio.Future[None]] = {}
        self._reconnects = 0
        self._published = 0
        self._publish_failures = 0
        self._returned = 0
        self._rejected = 0

    @property
    def user_id(self) -> str:  # type: ignore[override]
        """The login of the connected host: what RabbitMQ validates ``user_id`` against."""
        conn = self._connection
        if conn is not None:
            user = conn.url.user
            if user:
                return user
        return self._url.users[0] or ""

    @property
    def connected(self) -> bool:
        # aio-pika clears ``connected`` when the link closes and sets it again once a
        # reconnect has opened the new one.
        connection = self._connection
        return (
            connection is not None
            and not connection.is_closed
            and connection.transport is not None
            and connection.connected.is_set()
        )

    async def connect(self) -> None:
        if self._connection is not None:
            return
        name = f"{os.path.basename(sys.argv[0] or 'python')}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        hosts = self._url.hosts
        # The first connect walks every host once (each attempt starting at the next host).
        last_error: BaseException | None = None
        for start in range(len(hosts)):
            connection = _FailoverRobustConnection(
                hosts[start:] + hosts[:start],
                reconnect_interval=self._reconnect_interval,
                ssl_context=self._ssl_context,
                client_properties={"connection_name": name},
            )
            try:
                await connection.connect(timeout=self._connect_timeout)
                break
            except (aiormq.exceptions.AMQPError, ConnectionError, OSError, TimeoutError) as exc:
                last_error = exc
                log.warning(
                    "broker_connect_failed",
                    url=str(connection),
                    error=describe_broker_failure(exc),
                )
                await connection.close()
        else:
            assert last_error is not None
            # One line an operator can act on (a refused login, a missing vhost, a wrong CA ...)
            # and the URL, password masked: never aio-pika's repr of an AMQP frame.
            raise BrokerConnectFailed(
                f"cannot connect to the broker at {connection}: "
                f"{describe_broker_failure(last_error)}"
            ) from last_error
        connection.reconnect_callbacks.add(self._on_reconnect)
        self._connection = connection
        self._publisher = await connection.channel(publisher_confirms=self._publisher_confirms)
        log.info("broker_connected", url=str(connection))

    def _on_reconnect(self, *_: Any) -> None:
        self._reconnects += 1
        log.warning("broker_reconnected", url=str(self._connection), reconnects=self._reconnects)
        # aio-pika calls this after restoring channels (queues, exchanges, bindings).
        self._notify_reconnected()

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._publisher = None
        self._declared.clear()
        for task in self._stale_channels:
            task.cancel()  # closing the connection closes them
        if connection is not None:
            try:
                async with asyncio.timeout(_TEARDOWN_TIMEOUT):
                    await connection.close()
            except _TEARDOWN_ERRORS as exc:
                log.warning("connection_close_failed", error=repr(exc))

    def _require(self) -> tuple[_FailoverRobustConnection, AbstractRobustChannel]:
        if self._connection is None or self._publisher is None:
            raise MessagingError("transport is not connected (use 'async with transport')")
        return self._connection, self._publisher

    async def _declare_exchange(self, channel: AbstractRobustChannel, spec: ExchangeSpec) -> None:
        await channel.declare_exchange(
            spec.name,
            aio_pika.ExchangeType(spec.type),
            durable=spec.durable,
            auto_delete=spec.auto_delete,
        )

    async def _ensure_exchange(self, spec: ExchangeSpec) -> None:
        # One declaration per exchange per driver; concurrent first publishers share it.
        future = self._declared.get(spec)
        if future is None:
            _, channel = self._require()
            future = self._declared[spec] = asyncio.ensure_future(
                self._declare_exchange(channel, spec)
            )
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            await asyncio.shield(future)
        except BaseException:
            if self._declared.get(spec) is future and future.done():
                del self._declared[spec]
            raise

    def _props(self, expiration: float | None) -> Basic.Properties:
        # kombu's defaults (wire reference 1.2) plus the user_id RabbitMQ validates.
        return Basic.Properties(
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            priority=0,
            headers={},
            user_id=self.user_id or None,
            expiration=str(max(1, int(expiration * 1000))) if expiration is not None else None,
        )

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
        connection, _ = self._require()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._publish_timeout if retry_for is None else retry_for)
        props = self._props(expiration)
        # The whole attempt is bounded: a lost connection makes aio-pika wait for the reconnect,
        # a blocked connection (broker alarm) makes writes wait; neither may hang a caller.
        try:
            async with asyncio.timeout_at(deadline):
                await self._publish_until_done(
                    connection, exchange, routing_key, body, props, mandatory, deadline
                )
        except TimeoutError:
            self._publish_failures += 1
            raise MessageDeliveryFailure(
                f"publish to {exchange.name!r}/{routing_key!r} not confirmed in time "
                "(broker unavailable or blocked)"
            ) from None

    async def _publish_until_done(
        self,
        connection: _FailoverRobustConnection,
        exchange: ExchangeSpec,
        routing_key: str,
        body: bytes,
        props: Basic.Properties,
        mandatory: bool,
        deadline: float,
    ) -> None:
        refused = 0
        first_nack: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            # Re-read on every attempt: a nack may have replaced the publisher channel.
            _, channel = self._require()
            try:
                if exchange.name:
                    await self._ensure_exchange(exchange)
                underlay = await channel.get_underlay_channel()
                result = await underlay.basic_publish(
                    body,
                    exchange=exchange.name,
                    routing_key=routing_key,
                    properties=props,
                    mandatory=mandatory,
                    # With confirms we await the broker's ack anyway; don't also serialise
                    # concurrent publishers on the socket drain.
                    wait=not self._publisher_confirms,  # type: ignore[call-arg]
                )
            except aiormq.exceptions.DeliveryError as exc:
                if isinstance(exc.frame, Basic.Nack) and len(self._url.hosts) > 1:
                    # A quorum queue nacks every publish of a channel that first published to
                    # it while the node of its leader had just died, for as long as that node
                    # stays down (RabbitMQ 3.10; tests/faults/test_rabbit_cluster.py); a new
                    # channel is not affected once the new leader is known. A queue that is
                    # really full keeps nacking: after the window that is final.
                    first_nack = first_nack if first_nack is not None else loop.time()
                    if loop.time() - first_nack < _NACK_RETRY_WINDOW:
                        await self._renew_publisher(channel)
                        await asyncio.sleep(_NACK_RETRY_PAUSE)
                        continue
                self._publish_failures += 1
                if isinstance(exc.frame, Basic.Nack):
                    self._rejected += 1
                    # basic.nack: a queue the message routes to refused it; with Fleet's
                    # policies (overflow=reject-publish) that is a queue at its length limit.
                    raise MessageRejected(
                        f"queue full: the broker refused the message to "
                        f"{exchange.name or 'amq.default'!r}/{routing_key!r} (basic.nack: a "
                        "queue it routes to is at its length limit, overflow=reject-publish); "
                        "it was not enqueued",
                        exchange=exchange.name,
                        routing_key=routing_key,
                    ) from exc
                raise MessageDeliveryFailure(f"broker refused the message: {exc!r}") from exc
            except (
                aiormq.exceptions.ChannelPreconditionFailed,
                aiormq.exceptions.ChannelAccessRefused,
            ) as exc:
                if "max size" in str(exc):
                    self._refuse_size(exc, exchange, routing_key, len(body))
                # An inequivalent exchange, a refused user_id, no permission. The channel close
                # also fails every concurrent publish, so one retry tells "ours" from "theirs".
                self._declared.pop(exchange, None)
                refused += 1
                if refused > 1:
                    self._publish_failures += 1
                    raise MessageDeliveryFailure(f"broker refused the publish: {exc!r}") from exc
                await self._pause_or_fail(deadline, exc)
                continue
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                # The exchange vanished (e.g. an auto-delete fanout exchange): declare it again.
                self._declared.pop(exchange, None)
                await self._pause_or_fail(deadline, exc)
                continue
            except _RETRYABLE as exc:
                if connection.is_closed and self._connection is None:
                    raise MessageDeliveryFailure("transport closed") from exc
                await self._pause_or_fail(deadline, exc)
                continue
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # our caller was cancelled: honour it
                # aiormq cancels a pending confirm when the connection dies (heartbeat lost):
                # that is a lost connection, not a cancellation of the caller.
                if connection.is_closed and self._connection is None:
                    raise MessageDeliveryFailure("transport closed") from exc
                await self._pause_or_fail(deadline, exc)
                continue
            if isinstance(result, aiormq.abc.DeliveredMessage):
                self._returned += 1
                raise MessageUndeliverable(
                    f"NO_ROUTE: message to {exchange.name!r}/{routing_key!r} was returned"
                )
            self._published += 1
            return

    async def _renew_publisher(self, stale: AbstractRobustChannel) -> None:
        """Replace the publisher channel ``stale`` (unless another publisher already did)."""
        if self._renewing is None:
            self._renewing = asyncio.Lock()
        async with self._renewing:
            connection = self._connection
            if self._publisher is not stale or connection is None:
                return
            try:
                fresh = await connection.channel(publisher_confirms=self._publisher_confirms)
            except (*_RETRYABLE, aiormq.exceptions.AMQPError) as exc:
                # The connection is going: its reconnect brings new channels anyway.
                log.warning("publisher_channel_renew_failed", error=repr(exc))
                return
            self._publisher = fresh
            log.warning("publisher_channel_renewed", reason="basic.nack")
        task = asyncio.ensure_future(self._close_later(stale))
        self._stale_channels.add(task)
        task.add_done_callback(self._stale_channels.discard)

    @staticmethod
    async def _close_later(channel: AbstractRobustChannel) -> None:
        await asyncio.sleep(_STALE_CHANNEL_GRACE)
        try:
            async with asyncio.timeout(_TEARDOWN_TIMEOUT):
                await channel.close()
        except _TEARDOWN_ERRORS as exc:
            log.debug("stale_channel_close_failed", error=repr(exc))

    def _refuse_size(
        self, exc: Exception, exchange: ExchangeSpec, routing_key: str, size: int
    ) -> NoReturn:
        """The broker's max_message_size refused the body (deploy/rabbitmq/20-fleet-limits.conf):
        sending it again would be refused again."""
        self._publish_failures += 1
        self._rejected += 1
        raise MessageRejected(
            f"the broker refused a message of {size} bytes to "
            f"{exchange.name or 'amq.default'!r}/{routing_key!r}: larger than its "
            f"max_message_size ({exc}); it was not enqueued",
            exchange=exchange.name,
            routing_key=routing_key,
        ) from exc

    async def _pause_or_fail(self, deadline: float, exc: BaseException) -> None:
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            self._publish_failures += 1
            raise MessageDeliveryFailure(f"publish failed, broker unavailable: {exc!r}") from exc
        log.debug("publish_retry", error=repr(exc), remaining=round(remaining, 2))
        await asyncio.sleep(min(_RETRY_PAUSE, remaining))

    async def _declare_on(self, channel: AbstractRobustChannel, spec: QueueSpec) -> None:
        if spec.exchange is not None and spec.exchange.name:
            await self._declare_exchange(channel, spec.exchange)
        if spec.exclusive:
            await self._declare_exclusive(channel, spec)
            return
        queue: AbstractRobustQueue = await channel.declare_queue(
            spec.name,
            durable=spec.durable,
            auto_delete=spec.auto_delete,
            arguments=spec.arguments_dict or None,
        )
        if spec.exchange is not None and spec.exchange.name:
            await queue.bind(spec.exchange.name, routing_key=spec.routing_key)

    async def _declare_exclusive(self, channel: AbstractRobustChannel, spec: QueueSpec) -> None:
        """Declare (and bind) an exclusive queue on a throwaway channel of ``channel``'s
        connection: exclusivity belongs to the connection, and a refusal (RESOURCE_LOCKED) then
        closes only that channel. Not registered with aio-pika (see the module docstring)."""
        underlay = await channel.get_underlay_channel()
        probe = await underlay.connection.channel(publisher_confirms=False)
        try:
            await probe.queue_declare(
                spec.name,
                durable=spec.durable,
                exclusive=True,
                auto_delete=spec.auto_delete,
                arguments=spec.arguments_dict or None,
            )
            if spec.exchange is not None and spec.exchange.name:
                await probe.queue_bind(spec.name, spec.exchange.name, routing_key=spec.routing_key)
        finally:
            if not probe.is_closed:
                try:
                    await probe.close()
                except _TEARDOWN_ERRORS as exc:
                    log.debug("probe_channel_close_failed", error=repr(exc))

    async def declare(self, queues: Sequence[QueueSpec]) -> None:
        _, channel = self._require()
        for spec in queues:
            try:
                await self._declare_on(channel, spec)
            except aiormq.exceptions.AMQPError as exc:
                raise MessagingError(f"cannot declare {spec}: {exc!r}") from exc

    async def subscribe(
        self,
        queues: Sequence[QueueSpec],
        callback: DeliveryCallback,
        *,
        prefetch: int = 0,
        no_ack: bool = False,
    ) -> Subscription:
        connection, _ = self._require()
        names = [q.name for q in queues]
        try:
            channel: AbstractRobustChannel = await connection.channel(publisher_confirms=False)
        except _RETRYABLE as exc:
            # No connection right now (a broker restart): the caller may try again.
            raise MessageDeliveryFailure(
                f"cannot subscribe to {names}: broker unavailable ({exc!r})"
            ) from exc
        subscription = _RabbitSubscription(
            channel, callback, no_ack, self._declare_on, self._notify_reconnected
        )
        try:
            if prefetch > 0:
                await channel.set_qos(prefetch_count=prefetch)
            for spec in queues:
                await self._declare_on(channel, spec)
                await subscription.add(spec)
        except _REFUSALS as exc:
            # e.g. 406 PRECONDITION_FAILED: a queue exists with other flags or arguments.
            await subscription.close()
            raise MessagingError(f"cannot declare or consume {names}: {exc!r}") from exc
        except (*_RETRYABLE, aiormq.exceptions.AMQPError) as exc:
            await subscription.close()
            raise MessageDeliveryFailure(
                f"cannot subscribe to {names}: connection lost ({exc!r})"
            ) from exc
        except BaseException:
            await subscription.close()
            raise
        return subscription

    async def delete_queue(self, name: str) -> None:
        _, channel = self._require()
        if not _is_up(channel):
            raise MessagingError(f"cannot delete queue {name}: not connected")
        try:
            async with asyncio.timeout(_TEARDOWN_TIMEOUT):
                underlay = await channel.get_underlay_channel()
                await underlay.queue_delete(name)
        except _TEARDOWN_ERRORS as exc:
            raise MessagingError(f"cannot delete queue {name}: {exc!r}") from exc

    def stats(self) -> dict[str, Any]:
        return {
            "reconnects": self._reconnects,
            "published": self._published,
            "publish_failures": self._publish_failures,
            "returned": self._returned,
            "rejected": self._rejected,
        }
