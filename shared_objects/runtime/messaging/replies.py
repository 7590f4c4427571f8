"""The per-transport reply queue and the futures of calls waiting on it.

One ``reply_<login>_<32 hex>`` queue per transport, exclusive to its connection, created on the
first call and shared by every client on the transport (oslo also shares one). Each call
registers a waiter under its ``_msg_id``, optionally with an ``accept`` predicate over the
broker-validated AMQP ``user_id`` of what arrives: a reply or heartbeat from any other login is
dropped (``reply_refused``, counted in ``forged_replies``) and the call keeps waiting for the
genuine one. The waiter is removed when the call ends however it ends, so nothing leaks. A reply
nobody waits for (the call timed out) is dropped with an INFO log line. A reply larger or deeper
than the transport's ``limits`` is not decoded: the call it answers (found by a bounded scan for
its ``_msg_id``) fails at once with ``MessageTooLarge`` / ``MessageTooDeep`` when its sender is
accepted, else the reply is dropped; either way one short log line (``reply_refused_unreadable``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from shared_objects.runtime.messaging import codec
from shared_objects.runtime.messaging.driver import Delivery, Driver, Subscription
from shared_objects.runtime.messaging.exceptions import (
    MalformedMessage,
    MessageDeliveryFailure,
    MessageTooDeep,
    MessageTooLarge,
    MessagingError,
)
from shared_objects.runtime.messaging.limits import MessageLimits, scan_keys
from shared_objects.runtime.messaging.topology import QueueSpec

log = structlog.get_logger(__name__)


# Pause between attempts to create the reply queue while the broker is unreachable.
_SUBSCRIBE_PAUSE = 0.25

#: Decides whether a reply's AMQP ``user_id`` (None when the publisher set none) may answer.
AcceptReply = Callable[[str | None], bool]


class _Waiter:
    __slots__ = ("accept", "future", "on_heartbeat")

    def __init__(
        self,
        future: asyncio.Future[dict[str, Any]],
        on_heartbeat: Callable[[], None] | None,
        accept: AcceptReply | None,
    ):
        self.future = future
        self.on_heartbeat = on_heartbeat
        self.accept = accept


class ReplyWaiter:
    """Owns the reply queue and routes replies to the waiting calls by ``_msg_id``."""

    def __init__(self, driver: Driver, spec: QueueSpec, *, limits: MessageLimits):
        self._driver = driver
        self.spec = spec
        self._limits = limits
        self._waiters: dict[str, _Waiter] = {}
        self._subscription: Subscription | None = None
        self._lock = asyncio.Lock()
        self.late_replies = 0
        self.malformed_replies = 0
        self.forged_replies = 0
        self.refused_replies = 0

    @property
    def queue_name(self) -> str:
        return self.spec.name

    @property
    def pending(self) -> int:
        """Calls currently waiting for a reply (0 when idle: nothing leaked)."""
        return len(self._waiters)

    async def ensure_listening(self) -> None:
        """Declare and consume the reply queue once (concurrent first calls share the work)."""
        if self._subscription is not None:
            return
        async with self._lock:
            while self._subscription is None:
                try:
                    # no_ack: replies are consumed as fast as they come, nothing waits unacked.
                    self._subscription = await self._driver.subscribe(
                        [self.spec], self._on_reply, prefetch=0, no_ack=True
                    )
                except MessageDeliveryFailure as exc:
                    # The broker is away (the first call of a process during a restart): try
                    # again until it is back; the calling call's deadline bounds the wait.
                    log.debug("reply_queue_not_yet", queue=self.spec.name, error=str(exc))
                    await asyncio.sleep(_SUBSCRIBE_PAUSE)
                    continue
                log.debug("reply_queue_listening", queue=self.spec.name)

    def register(
        self,
        msg_id: str,
        on_heartbeat: Callable[[], None] | None = None,
        accept: AcceptReply | None = None,
    ) -> asyncio.Future[dict[str, Any]]:
        """A future for the reply to ``msg_id``; ``on_heartbeat`` runs on call-monitor
        heartbeats; ``accept`` (None: anyone) must approve the sender's login of both."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[msg_id] = _Waiter(future, on_heartbeat, accept)
        return future

    def unregister(self, msg_id: str) -> None:
        self._waiters.pop(msg_id, None)

    async def _on_reply(self, delivery: Delivery) -> None:
        try:
            message = await codec.decode_received(delivery.body, self._limits)
        except (MessageTooLarge, MessageTooDeep) as exc:
            self._refuse_unreadable(delivery, exc)
            return
        except MalformedMessage as exc:
            self.malformed_replies += 1
            log.warning("reply_malformed_dropped", error=str(exc), size=len(delivery.body))
            return
        msg_id = message.get("_msg_id")
        waiter = self._waiters.get(msg_id) if isinstance(msg_id, str) else None
        if waiter is None:
            self.late_replies += 1
            log.info("late_reply_dropped", msg_id=msg_id, reason="no call waiting for this msg_id")
            return
        accept = waiter.accept
        if accept is not None and not accept(delivery.user_id):
            # Someone who can publish to our reply queue and knows the msg_id, but is not the
            # peer we called: ignore it, the call keeps waiting for the real reply.
            self.forged_replies += 1
            log.warning(
                "reply_refused",
                msg_id=msg_id,
                login=delivery.user_id,
                queue=self.spec.name,
                heartbeat=message.get("ending") is False,
            )
            return
        if message.get("ending") is False:
            # Call-monitor heartbeat: the server is still working on it.
            if waiter.on_heartbeat is not None:
                waiter.on_heartbeat()
            return
        if not waiter.future.done():
            waiter.future.set_result(message)

    def _refuse_unreadable(self, delivery: Delivery, exc: MalformedMessage) -> None:
        self.refused_replies += 1
        msg_id = scan_keys(delivery.body).get("_msg_id")
        waiter = self._waiters.get(msg_id) if msg_id is not None else None
        failed = False
        if waiter is not None and (waiter.accept is None or waiter.accept(delivery.user_id)):
            if not waiter.future.done():
                waiter.future.set_exception(type(exc)(*exc.args))
                failed = True
        log.warning(
            "reply_refused_unreadable",
            reason=type(exc).__name__,
            size=len(delivery.body),
            msg_id=msg_id,
            login=delivery.user_id,
            call_failed=failed,
        )

    async def close(self) -> None:
        """Stop listening and delete the reply queue (it is unique to this transport)."""
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.close()
            try:
                await self._driver.delete_queue(self.spec.name)
            except Exception as exc:  # broker gone: the queue expires by x-expires anyway
                log.warning("reply_queue_delete_failed", queue=self.spec.name, error=repr(exc))
        for waiter in self._waiters.values():
            if not waiter.future.done():
                waiter.future.set_exception(
                    MessagingError("transport closed while the call was waiting for its reply")
                )
