"""RPCServer: consumes a topic, dispatches to endpoints, replies in oslo's format.

Delivery semantics (like oslo): a request is acknowledged when it is taken up for execution, before
the handler runs: at-most-once. Every received message is acknowledged, including malformed ones,
so nothing stays unacked. Concurrency is bounded twice: the broker delivers at most
``rabbit_qos_prefetch_count`` unacknowledged messages, and at most ``max_concurrency`` handlers run
at once (a message waiting for a slot stays unacked, so ``stop`` can hand it back to the broker).

Trust: the caller is the broker-validated AMQP ``user_id`` (``ctxt.caller``); the wire context's
``is_admin`` and ``roles`` are claims and are cleared. With ``require_user_id`` a request without
a ``user_id`` is refused, and an ``authorizer`` decides every request after its method is found
and before its arguments are deserialised (``shared_objects.runtime.messaging.authorization``).

Limits: a body over the transport's ``limits`` (``[messaging] max_message_bytes`` /
``max_message_depth``) is refused before any JSON decoding, with a short error reply when its
reply address is found cheaply and one short log line (``shared_objects.runtime.messaging.limits``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import structlog
import structlog.contextvars

from shared_objects.context import RequestContext, generate_request_id
from shared_objects.runtime.messaging import codec
from shared_objects.runtime.messaging.authorization import Authorizer, check_coverage
from shared_objects.runtime.messaging.dispatcher import Dispatcher
from shared_objects.runtime.messaging.driver import Delivery, Subscription
from shared_objects.runtime.messaging.exceptions import (
    ExpectedException,
    InvalidTarget,
    MalformedMessage,
    MessageDeliveryFailure,
    MessageTooDeep,
    MessageTooLarge,
    UnsupportedEnvelopeVersion,
    UnsupportedVersion,
)
from shared_objects.runtime.messaging.ids import new_id
from shared_objects.runtime.messaging.reply_sender import ReplySender
from shared_objects.runtime.messaging.request_scope import _REQUEST_VERSION, _SLOT, _Slot
from shared_objects.runtime.messaging.serializer import NoOpSerializer, Serializer
from shared_objects.runtime.messaging.server_failures import (
    FailureReplies,
    _Refused,
    _Reply,
    _wants_heartbeat,
)
from shared_objects.runtime.messaging.stats import RPCStats
from shared_objects.runtime.messaging.target import Target
from shared_objects.runtime.messaging.topology import QueueSpec

if TYPE_CHECKING:
    from shared_objects.runtime.messaging.transport import Transport


log = structlog.get_logger(__name__)


# oslo's _MsgIdCache.DUP_MSG_CHECK_SIZE: a request whose _unique_id is among the last 16 is a
# redelivered duplicate and is dropped.
DUPLICATE_CHECK_SIZE = 16


class RPCServer(FailureReplies):
    """Serves ``endpoints`` on ``target.topic`` (+ ``<topic>.<server>`` and fanout).

    ``max_concurrency`` (default: the transport's ``max_concurrency``) bounds handlers running at
    once (a handler that only waits for another task's batch may leave the count early:
    ``release_handler_slot``); ``prefetch`` (default ``rabbit_qos_prefetch_count``) bounds
    messages delivered but not yet taken up; a reply whose queue is missing is retried in the
    background for ``reply_retry_window`` seconds (0: never).

    Security (``docs/rpc.md``): ``authorizer`` (an ``Authorizer``) must cover every exposed
    (namespace, method), else construction raises ``UncoveredMethods``; it then decides every
    request. ``require_user_id`` refuses requests without a broker-validated AMQP ``user_id``
    (off by default: oslo.messaging publishers never set one; Fleet services turn it on).
    ``listen_on_topic=False`` consumes only ``<topic>.<server>`` and the fanout queue, not the
    shared ``<topic>`` queue.

    ``error_boundary`` (a context-manager factory) is entered around every handler call: where a
    service turns the errors of its inner layers into the ones its callers know (``raise ...
    from exc``), so nothing internal crosses the wire (the agent's: ``compute_agent/rpc_errors``).
    """

    def __init__(
        self,
        transport: Transport,
        target: Target,
        endpoints: Iterable[Any],
        serializer: Serializer | None = None,
        max_concurrency: int | None = None,
        *,
        prefetch: int | None = None,
        reply_retry_window: float = 5.0,
        authorizer: Authorizer | None = None,
        require_user_id: bool = False,
        listen_on_topic: bool = True,
        error_boundary: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
    ):
        if not target.topic or not target.server:
            raise InvalidTarget("A server's target needs a topic and a server", target)
        self.transport = transport
        self.target = target
        self.dispatcher = Dispatcher(endpoints)
        if authorizer is not None:
            check_coverage(authorizer, self.dispatcher.exposed_pairs())
        self.authorizer = authorizer
        self.require_user_id = require_user_id
        self.listen_on_topic = listen_on_topic
        self.error_boundary = (
            error_boundary if error_boundary is not None else contextlib.nullcontext
        )
        self.serializer = serializer if serializer is not None else NoOpSerializer()
        self._noop = type(self.serializer) is NoOpSerializer
        cfg = transport.config
        self.max_concurrency = max_concurrency or cfg.max_concurrency
        self.prefetch = cfg.rabbit_qos_prefetch_count if prefetch is None else prefetch
        self._semaphore = asyncio.Semaphore(self.max_concurrency)
        self._subscription: Subscription | None = None
        self._fanout_queue: QueueSpec | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._recent_ids: collections.deque[str] = collections.deque(maxlen=DUPLICATE_CHECK_SIZE)
        self._stopping = False
        self._stats = RPCStats()
        # Optional ``observe(method, seconds)`` called for every handled request (metrics).
        self.latency_observer: Callable[[str, float], None] | None = None
        self._replies = ReplySender(
            transport.driver,
            self._stats,
            publish_timeout=cfg.rpc_response_timeout,
            retry_window=reply_retry_window,
        )
        self._exposed = self.dispatcher.exposed_methods()

    @property
    def running(self) -> bool:
        return self._subscription is not None

    async def start(self) -> None:
        """Declare the queues (argument-identical to oslo's) and start consuming."""
        if self._subscription is not None:
            return
        topology = self.transport.topology
        topic, server = self.target.topic, self.target.server
        assert topic is not None and server is not None
        exchange = topology.control_exchange(self.target.exchange)
        self._fanout_queue = topology.fanout_queue(topic, server)
        queues = [
            topology.topic_queue(exchange, f"{topic}.{server}"),
            self._fanout_queue,
        ]
        if self.listen_on_topic:
            queues.insert(0, topology.topic_queue(exchange, topic))
        self._stopping = False
        self._subscription = await self.transport.driver.subscribe(
            queues, self._on_delivery, prefetch=self.prefetch
        )
        log.info(
            "rpc_server_started",
            topic=topic,
            server=server,
            exchange=exchange.name,
            queues=[q.name for q in queues],
            authorizer=type(self.authorizer).__name__ if self.authorizer is not None else None,
            require_user_id=self.require_user_id,
        )

    async def stop(self, grace: float = 30.0) -> None:
        """Stop consuming, let running handlers finish for up to ``grace`` seconds, then cancel
        what is left. Messages delivered but not started go back to the broker."""
        subscription, self._subscription = self._subscription, None
        if subscription is None:
            return
        self._stopping = True
        await subscription.cancel()
        tasks = set(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("rpc_server_stop_cancelled_handlers", count=len(pending), grace=grace)
                await asyncio.gather(*pending, return_exceptions=True)
        await subscription.close()
        await self._replies.close()
        if self._fanout_queue is not None:
            try:
                await self.transport.driver.delete_queue(self._fanout_queue.name)
            except Exception as exc:  # broker errors: the queue still expires by x-expires
                log.warning(
                    "fanout_queue_delete_failed", queue=self._fanout_queue.name, error=repr(exc)
                )
        log.info("rpc_server_stopped", topic=self.target.topic, server=self.target.server)

    async def __aenter__(self) -> RPCServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def stats(self) -> dict[str, Any]:
        """Calls by (method, outcome), handlers in flight, dropped messages by reason."""
        return self._stats.as_dict()

    @property
    def in_flight(self) -> int:
        return self._stats.in_flight

    async def _on_delivery(self, delivery: Delivery) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._semaphore.acquire()
            slot = _Slot(self._semaphore)
            token = _SLOT.set(slot)
            try:
                if self._stopping:
                    return  # not acked: the broker redelivers it when our channel closes
                try:
                    await delivery.ack()
                except MessageDeliveryFailure as exc:
                    # The channel went away: the broker redelivers the message, don't run it here.
                    log.warning("rpc_ack_failed", error=str(exc))
                    return
                self._stats.in_flight += 1
                try:
                    await self._process(delivery)
                finally:
                    self._stats.in_flight -= 1
            finally:
                _SLOT.reset(token)
                slot.release()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug in our own handling: log it, keep serving.
            log.exception("rpc_message_handling_failed")
        finally:
            self._tasks.discard(task)

    def _drop(self, reason: str, **kw: Any) -> None:
        self._stats.dropped[reason] += 1
        log.warning("rpc_message_dropped", reason=reason, **kw)

    async def _process(self, delivery: Delivery) -> None:
        try:
            message = await codec.decode_received(delivery.body, self.transport.limits)
        except (MessageTooLarge, MessageTooDeep) as exc:
            await self._refuse_unreadable(delivery, exc)
            return
        except UnsupportedEnvelopeVersion as exc:
            reply = _Reply.from_message(exc.message) if exc.message else None
            if self.require_user_id and not delivery.user_id:
                await self._refuse_unauthenticated(delivery, reply)
                return
            if reply is None:
                self._drop("unsupported_envelope", error=str(exc), size=len(delivery.body))
                return
            self._stats.record("<unknown>", "malformed")
            await self._send_failure(reply, exc)
            return
        except MalformedMessage as exc:
            self._drop("malformed", error=str(exc), size=len(delivery.body))
            return

        reply = _Reply.from_message(message)
        if self.require_user_id and not delivery.user_id:
            await self._refuse_unauthenticated(delivery, reply)
            return
        client_timeout = message.pop("_timeout", None)
        unique_id = message.pop("_unique_id", None)
        if isinstance(unique_id, str):
            if unique_id in self._recent_ids:
                self._drop("duplicate", unique_id=unique_id)
                return
            self._recent_ids.append(unique_id)

        method = message.get("method")
        label = method if isinstance(method, str) and method in self._exposed else "<unknown>"
        try:
            ctxt = self._context(message, delivery.user_id)
        except (TypeError, ValueError) as exc:
            await self._fail(reply, label, MalformedMessage(f"bad context: {exc}"), None)
            return

        version = message.get("version")
        with structlog.contextvars.bound_contextvars(
            request_id=ctxt.request_id,
            caller=ctxt.caller,
            method=label,
            # The API version the caller chose: shows version caps at work in every log line.
            rpc_version=version if isinstance(version, str) else None,
        ):
            heartbeat = None
            if reply is not None and _wants_heartbeat(client_timeout):
                heartbeat = asyncio.create_task(self._heartbeat(reply, int(client_timeout) / 2))
            version_token = _REQUEST_VERSION.set(version if isinstance(version, str) else None)
            started = time.monotonic()
            try:
                result = await self._dispatch(ctxt, message)
                body = (
                    codec.encode_message(
                        {
                            "result": result,
                            "failure": None,
                            "ending": True,
                            "_msg_id": reply.msg_id,
                            "_unique_id": new_id(),
                        }
                    )
                    if reply is not None
                    else None
                )
            except ExpectedException as wrapped:
                log.debug("rpc_expected_exception", error=repr(wrapped.exc))
                await self._fail(reply, label, wrapped.exc, heartbeat, expected=True)
                return
            except _Refused as refused:
                await self._refuse(reply, label, refused.exc, heartbeat)
                return
            except Exception as exc:
                await self._fail(reply, label, exc, heartbeat)
                return
            finally:
                _REQUEST_VERSION.reset(version_token)
                if self.latency_observer is not None:
                    self.latency_observer(label, time.monotonic() - started)
                if heartbeat is not None:
                    heartbeat.cancel()
            self._stats.record(label, "ok")
            if reply is not None and body is not None:
                if len(body) > self.transport.limits.max_bytes:
                    # The caller would refuse it unread: tell it why instead of letting it wait.
                    too_large = MessageTooLarge(len(body), self.transport.limits.max_bytes)
                    self._stats.dropped["reply_too_large"] += 1
                    log.warning("rpc_reply_too_large", size=len(body), limit=too_large.limit)
                    await self._send_failure(reply, too_large)
                    return
                await self._publish_reply(reply, body)

    def _context(self, message: dict[str, Any], user_id: str | None) -> RequestContext:
        ctxt = RequestContext.from_dict(codec.unpack_context(message), caller=user_id)
        if not isinstance(ctxt.request_id, str) or not ctxt.request_id:
            ctxt.request_id = generate_request_id()
        # Privileges come from the broker login, never from what the sender claims: the wire
        # ``is_admin`` / ``roles`` are dropped (not kept in ``extra``, so they are not passed on
        # by onward calls either).
        ctxt.is_admin = False
        ctxt.roles = []
        return ctxt

    async def _dispatch(self, ctxt: RequestContext, message: dict[str, Any]) -> Any:
        method = message.get("method")
        if not isinstance(method, str) or not method:
            raise MalformedMessage("request has no method name")
        args = message.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise MalformedMessage(f"args must be an object, not {type(args).__name__}")
        namespace = message.get("namespace")
        version = message.get("version")
        if namespace is not None and not isinstance(namespace, str):
            raise MalformedMessage("namespace must be a string")
        if version is not None and not isinstance(version, str):
            raise UnsupportedVersion(str(version), method)
        handler = self.dispatcher.lookup(method, namespace, version)
        authorizer = self.authorizer
        if authorizer is not None:
            try:
                authorizer.authorize(ctxt, namespace, method)
            except Exception as exc:
                raise _Refused(exc) from None
        if not self._noop:
            args = {k: await self.serializer.deserialize_entity(ctxt, v) for k, v in args.items()}
        with self.error_boundary():
            result = handler(ctxt, **args)
            if inspect.isawaitable(result):
                result = await result
        if not self._noop:
            result = await self.serializer.serialize_entity(ctxt, result)
        return result
