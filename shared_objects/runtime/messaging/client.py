"""RPCClient: call (request/reply with timeout), cast, fanout cast, version negotiation."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog

from shared_objects.context import RequestContext
from shared_objects.runtime.messaging import codec
from shared_objects.runtime.messaging.authorization import ReplyFrom
from shared_objects.runtime.messaging.exceptions import (
    InvalidTarget,
    MalformedMessage,
    MessageDeliveryFailure,
    MessageTooLarge,
    MessageUndeliverable,
    MessagingTimeout,
    RPCVersionCapError,
)
from shared_objects.runtime.messaging.ids import new_id
from shared_objects.runtime.messaging.replies import AcceptReply
from shared_objects.runtime.messaging.serializer import NoOpSerializer, Serializer
from shared_objects.runtime.messaging.stats import RPCStats
from shared_objects.runtime.messaging.target import Target
from shared_objects.runtime.messaging.topology import ExchangeSpec
from shared_objects.runtime.messaging.versions import version_is_compatible

if TYPE_CHECKING:
    from shared_objects.runtime.messaging.transport import Transport

log = structlog.get_logger(__name__)

_UNSET: Any = object()
# How often a call to a topic nobody serves right now re-tries its publish (a server may be
# re-declaring its queue after a broker restart).
_NO_ROUTE_PAUSE = 0.25
Context = RequestContext | Mapping[str, Any] | None


class CallContext:
    """A client bound to one target and set of options; what ``RPCClient.prepare`` returns."""

    def __init__(
        self,
        transport: Transport,
        target: Target,
        serializer: Serializer,
        timeout: float,
        version_cap: str | None,
        call_monitor_timeout: float | None,
        stats: RPCStats,
        reply_from: ReplyFrom | None = None,
    ):
        self.transport = transport
        self.target = target
        self.serializer = serializer
        self.timeout = timeout
        self.version_cap = version_cap
        self.call_monitor_timeout = call_monitor_timeout
        self.reply_from = reply_from
        # reply_from(target), made on the first call of this context (casts never need it).
        self._accept: AcceptReply | None = None
        self._stats = stats
        self._noop = type(serializer) is NoOpSerializer
        topology = transport.topology
        self._exchange: ExchangeSpec = topology.control_exchange(target.exchange)
        self._fanout_exchange = topology.fanout_exchange(target.topic) if target.topic else None
        self._routing_key = (
            f"{target.topic}.{target.server}" if target.server else (target.topic or "")
        )

    def can_send_version(self, version: str | None = _UNSET) -> bool:
        """True if ``version`` (default: the target's) is within the version cap."""
        version = self.target.version if version is _UNSET else version
        if not self.version_cap or version is None:
            return True
        return version_is_compatible(self.version_cap, version)

    def _check_version(self) -> None:
        version = self.target.version
        if self.version_cap and version and not version_is_compatible(self.version_cap, version):
            raise RPCVersionCapError(version, self.version_cap)

    async def _make_message(
        self, ctxt: Context, method: str, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        if not self._noop:
            kwargs = {k: await self.serializer.serialize_entity(ctxt, v) for k, v in kwargs.items()}  # type: ignore[arg-type]
        message: dict[str, Any] = {"method": method, "args": kwargs}
        if self.target.namespace is not None:
            message["namespace"] = self.target.namespace
        if self.target.version is not None:
            message["version"] = self.target.version
        return message

    async def call(self, ctxt: Context, method: str, **kwargs: Any) -> Any:
        """Invoke ``method`` on one server and return its result.

        Raises ``MessagingTimeout`` (no reply within ``timeout``, or no call-monitor heartbeat
        within ``call_monitor_timeout``), the remote exception (its own class for allowed
        modules, else ``RemoteError``), ``MessageDeliveryFailure`` or ``RPCVersionCapError``.
        """
        target = self.target
        if target.fanout:
            raise InvalidTarget("A call cannot be fanout", target)
        if not target.topic:
            raise InvalidTarget("A call needs a topic", target)
        self._check_version()
        replies = self.transport.replies
        message = await self._make_message(ctxt, method, kwargs)
        msg_id = new_id()
        cm_timeout = self.call_monitor_timeout
        message["_msg_id"] = msg_id
        message["_reply_q"] = replies.queue_name
        # oslo servers parse _timeout with int(): send whole seconds when possible.
        message["_timeout"] = (
            None
            if cm_timeout is None
            else int(cm_timeout)
            if cm_timeout == int(cm_timeout)
            else cm_timeout
        )
        message["_unique_id"] = new_id()
        message.update(codec.pack_context(ctxt))
        body = self._check_size(codec.encode_message(message))
        timeout = self.timeout

        loop = asyncio.get_running_loop()
        monitor: asyncio.Timeout | None = None
        unroutable_since: float | None = None

        def on_heartbeat() -> None:
            if monitor is not None and cm_timeout is not None:
                monitor.reschedule(loop.time() + cm_timeout)

        accept = self._accept
        if accept is None and self.reply_from is not None:
            accept = self._accept = self.reply_from(target)
        future = replies.register(msg_id, on_heartbeat if cm_timeout else None, accept)
        stats = self._stats
        stats.in_flight += 1
        overall = asyncio.timeout(timeout)
        try:
            async with overall:
                # Inside the timeout: the first call may have to wait for the broker.
                await replies.ensure_listening()
                deadline = loop.time() + timeout
                while True:
                    try:
                        await self._publish_mandatory(body, deadline - loop.time())
                        break
                    except MessageUndeliverable:
                        if target.server:
                            raise  # that server is not running: say so now
                        # Nobody serves the topic right now: one may be (re)declaring its
                        # queue, so keep trying until the deadline (then MessagingTimeout) or,
                        # with a call monitor, for as long as a heartbeat may be missing.
                        now = loop.time()
                        if unroutable_since is None:
                            unroutable_since = now
                        if cm_timeout is not None and now - unroutable_since >= cm_timeout:
                            raise TimeoutError from None
                        await asyncio.wait([future], timeout=_NO_ROUTE_PAUSE)
                        if future.done():
                            break  # answered anyway (an accepted reply ends any call)
                if cm_timeout is None:
                    reply = await future
                else:
                    monitor = asyncio.timeout(cm_timeout)
                    async with monitor:
                        reply = await future
        except MessageUndeliverable:
            stats.record(method, "undeliverable")
            raise
        except MessageDeliveryFailure:
            stats.record(method, "delivery_failure")
            raise
        except MalformedMessage:
            # The reply was refused unread (too large or too deep, see replies.py).
            stats.record(method, "reply_refused")
            raise
        except asyncio.CancelledError:
            stats.record(method, "cancelled")
            raise
        except TimeoutError:
            stats.record(method, "timeout")
            if unroutable_since is not None and monitor is None:
                waited = (
                    f"Timed out after {timeout}s"
                    if cm_timeout is None or overall.expired()
                    else f"No call-monitor heartbeat for {cm_timeout}s"
                )
                raise MessagingTimeout(
                    f"{waited}: no queue is bound for topic "
                    f"{target.topic!r} on exchange {self._exchange.name!r} (is any server of "
                    f"{target.topic!r} running?); {method!r} was never delivered "
                    f"(message ID {msg_id})",
                    method=method,
                    timeout=timeout,
                ) from None
            if overall.expired() or monitor is None or not monitor.expired():
                raise MessagingTimeout(
                    f"Timed out after {timeout}s waiting for a reply to {method!r} on "
                    f"{target} (message ID {msg_id})",
                    method=method,
                    timeout=timeout,
                ) from None
            raise MessagingTimeout(
                f"No call-monitor heartbeat for {cm_timeout}s from the server running {method!r} "
                f"on {target} (message ID {msg_id})",
                method=method,
                timeout=cm_timeout,
            ) from None
        finally:
            replies.unregister(msg_id)
            stats.in_flight -= 1
        failure = reply.get("failure")
        if failure:
            stats.record(method, "remote_error")
            raise codec.deserialize_remote_exception(failure, self.transport.allowed_remote_exmods)
        stats.record(method, "ok")
        result = reply.get("result")
        if self._noop:
            return result
        return await self.serializer.deserialize_entity(ctxt, result)  # type: ignore[arg-type]

    async def cast(self, ctxt: Context, method: str, **kwargs: Any) -> None:
        """Send ``method`` without waiting for a result (to every server if fanout)."""
        target = self.target
        if not target.topic:
            raise InvalidTarget("A cast needs a topic", target)
        self._check_version()
        message = await self._make_message(ctxt, method, kwargs)
        message["_unique_id"] = new_id()
        message.update(codec.pack_context(ctxt))
        body = self._check_size(codec.encode_message(message))
        if target.fanout:
            # No server listening is fine for a fanout: nobody needs telling.
            assert self._fanout_exchange is not None
            await self.transport.driver.publish(
                self._fanout_exchange, "", body, retry_for=self.timeout
            )
        elif target.server:
            try:
                await self._publish_mandatory(body, self.timeout, expiration=None)
            except MessageUndeliverable:
                self._stats.record(method, "undeliverable")
                raise
        else:
            # A topic cast is fire-and-forget, as in oslo: not waiting for a queue to appear.
            await self.transport.driver.publish(
                self._exchange, self._routing_key, body, retry_for=self.timeout
            )
        self._stats.record(method, "cast")

    def _check_size(self, body: bytes) -> bytes:
        # The receiver would refuse it unread: fail here, before it costs the broker anything.
        limit = self.transport.limits.max_bytes
        if len(body) > limit:
            raise MessageTooLarge(len(body), limit)
        return body

    async def _publish_mandatory(
        self, body: bytes, retry_for: float, *, expiration: float | None = _UNSET
    ) -> None:
        """Publish to the target's exchange and routing key with ``mandatory``: a message no
        queue is bound for comes back (basic.return, before the confirm) as
        ``MessageUndeliverable`` naming the target."""
        retry_for = max(retry_for, 0.001)
        try:
            await self.transport.driver.publish(
                self._exchange,
                self._routing_key,
                body,
                expiration=retry_for if expiration is _UNSET else expiration,
                mandatory=True,
                retry_for=retry_for,
            )
        except MessageUndeliverable as exc:
            target = self.target
            who = (
                f"is the {target.topic} server on {target.server!r} running?"
                if target.server
                else f"is any {target.topic} server running?"
            )
            raise MessageUndeliverable(
                f"no queue is bound for {self._routing_key!r} on exchange "
                f"{self._exchange.name!r}: {who}"
            ) from exc

    def prepare(
        self,
        *,
        topic: str | None = _UNSET,
        server: str | None = _UNSET,
        version: str | None = _UNSET,
        namespace: str | None = _UNSET,
        exchange: str | None = _UNSET,
        fanout: bool = _UNSET,
        timeout: float | None = _UNSET,
        version_cap: str | None = _UNSET,
        call_monitor_timeout: float | None = _UNSET,
    ) -> CallContext:
        """A copy with some target fields or options replaced (unset arguments are kept)."""
        changes = {
            k: v
            for k, v in {
                "topic": topic,
                "server": server,
                "version": version,
                "namespace": namespace,
                "exchange": exchange,
                "fanout": fanout,
            }.items()
            if v is not _UNSET
        }
        return CallContext(
            self.transport,
            self.target(**changes) if changes else self.target,
            self.serializer,
            self.timeout if timeout is _UNSET or timeout is None else timeout,
            self.version_cap if version_cap is _UNSET else version_cap,
            self.call_monitor_timeout if call_monitor_timeout is _UNSET else call_monitor_timeout,
            self._stats,
            self.reply_from,
        )


class RPCClient(CallContext):
    """Sends calls and casts to ``target`` over ``transport``.

    ``timeout`` defaults to the transport's ``rpc_response_timeout``. ``version_cap`` bounds the
    versions this client may send (``can_send_version``; sending above raises
    ``RPCVersionCapError``). ``call_monitor_timeout`` asks servers for heartbeats.

    ``reply_from`` (kept by ``prepare``) says who may answer: called with a call's target, it
    returns a predicate over the broker-validated AMQP ``user_id`` of the reply; replies and
    heartbeats it rejects are dropped and the call keeps waiting for the genuine reply. ``None``
    accepts any sender (today's oslo behaviour: generic and interop use only; Fleet services
    always pass one).
    """

    def __init__(
        self,
        transport: Transport,
        target: Target,
        serializer: Serializer | None = None,
        timeout: float | None = None,
        version_cap: str | None = None,
        call_monitor_timeout: float | None = None,
        *,
        reply_from: ReplyFrom | None = None,
    ):
        super().__init__(
            transport,
            target,
            serializer if serializer is not None else NoOpSerializer(),
            timeout if timeout is not None else transport.config.rpc_response_timeout,
            version_cap,
            call_monitor_timeout,
            RPCStats(),
            reply_from,
        )

    @property
    def pending_count(self) -> int:
        """Calls of this client (and its prepared contexts) waiting for a reply now."""
        return self._stats.in_flight

    def stats(self) -> dict[str, Any]:
        """Calls by method and outcome, in-flight count, plus transport counters."""
        return {**self._stats.as_dict(), "transport": self.transport.stats()}
