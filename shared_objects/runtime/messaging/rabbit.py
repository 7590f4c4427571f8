"""The aio-pika driver: one robust connection per transport, shared by every client and server.

Channels: one publisher channel (publisher confirms, pipelined by concurrent publishers), one
channel per subscription (its own prefetch). aio-pika's robust connection and channels restore
exchanges, queues and bindings after a reconnect, Fleet re-issues its consumers; with several
hosts in the URL each connection attempt moves on to the next host (round robin, like oslo's
default strategy).

Subscriptions (consumers restored after a reconnect, exclusive queues) are in
``rabbit_subscription.py``; the round-robin connection in ``rabbit_failover.py``.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import uuid
from collections.abc import Sequence
from typing import Any, NoReturn

import aio_pika
import aiormq
import aiormq.abc
import structlog
from aio_pika.abc import AbstractRobustChannel, AbstractRobustQueue
from pamqp.commands import Basic

from shared_objects.runtime.messaging.connect_errors import describe_broker_failure
from shared_objects.runtime.messaging.driver import DeliveryCallback, Driver, Subscription
from shared_objects.runtime.messaging.exceptions import (
    BrokerConnectFailed,
    MessageDeliveryFailure,
    MessageRejected,
    MessageUndeliverable,
    MessagingError,
)
from shared_objects.runtime.messaging.rabbit_failover import FailoverRobustConnection
from shared_objects.runtime.messaging.rabbit_subscription import (
    _REFUSALS,
    _STALE_CHANNEL_GRACE,
    _TEARDOWN_ERRORS,
    _TEARDOWN_TIMEOUT,
    RabbitSubscription,
    _is_up,
)
from shared_objects.runtime.messaging.topology import ExchangeSpec, QueueSpec
from shared_objects.runtime.messaging.urls import ParsedURL

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


# On a cluster (several hosts in the URL) a nacked publish is retried, each time on a new
# publisher channel, for this long before the nack counts as "queue full" (see
# _publish_until_done); a quorum queue's new leader is known within it.
_NACK_RETRY_WINDOW = 3.0
_NACK_RETRY_PAUSE = 0.3


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
        self._connection: FailoverRobustConnection | None = None
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
            connection = FailoverRobustConnection(
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

    def _require(self) -> tuple[FailoverRobustConnection, AbstractRobustChannel]:
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
        connection: FailoverRobustConnection,
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
        subscription = RabbitSubscription(
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
