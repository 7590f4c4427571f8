"""What an RPC server answers when a request fails or is refused (an error reply, the refusal
logged at its level) and the heartbeats it sends while a handler runs (``server.py``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import structlog
import structlog.contextvars

from shared_objects.runtime.messaging import codec
from shared_objects.runtime.messaging.authorization import is_refusal
from shared_objects.runtime.messaging.driver import Delivery
from shared_objects.runtime.messaging.exceptions import (
    MalformedMessage,
    MessageTooDeep,
    MessageTooLarge,
    NoSuchMethod,
    Unauthenticated,
    UnsupportedVersion,
)
from shared_objects.runtime.messaging.ids import new_id
from shared_objects.runtime.messaging.limits import reply_address
from shared_objects.runtime.messaging.reply_sender import ReplySender
from shared_objects.runtime.messaging.stats import RPCStats

log = structlog.get_logger(__name__)


_MAX_ROUTING_KEY = 255
# Errors that describe the request, not a server fault: logged without a traceback.
_CLIENT_ERRORS = (NoSuchMethod, UnsupportedVersion, MalformedMessage)
# ``rpc_log_level`` an exception class may set (duck-typed: this layer imports no error tree).
_REQUEST_ERROR_LEVELS = {"info": logging.INFO, "warning": logging.WARNING}


class _Refused(Exception):
    """Carries what ``Authorizer.authorize`` raised to the failure path (``RPCServer._refuse``)."""

    def __init__(self, exc: Exception):
        super().__init__()
        self.exc = exc


class _Reply:
    """Where a request's reply goes; ``None`` for casts and unaddressable messages."""

    __slots__ = ("msg_id", "queue")

    def __init__(self, queue: str, msg_id: str):
        self.queue = queue
        self.msg_id = msg_id

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> _Reply | None:
        queue = message.pop("_reply_q", None)
        msg_id = message.pop("_msg_id", None)
        if not isinstance(queue, str) or not isinstance(msg_id, str) or not queue:
            return None
        if len(queue.encode()) > _MAX_ROUTING_KEY:
            return None  # not a routable AMQP queue name
        return cls(queue, msg_id)


class FailureReplies:
    """What a server answers when a request fails or is refused, and the heartbeats it sends
    while a handler runs; ``RPCServer`` holds the state these use."""

    _stats: RPCStats
    _replies: ReplySender
    require_user_id: bool

    async def _fail(
        self,
        reply: _Reply | None,
        label: str,
        exc: BaseException,
        heartbeat: asyncio.Task[None] | None,
        *,
        expected: bool = False,
    ) -> None:
        if heartbeat is not None:
            heartbeat.cancel()
        # An error class may name its own outcome (Forbidden, DatabaseUnavailable...): the
        # metrics then tell a database outage from a bug.
        own = getattr(exc, "rpc_outcome", None)
        # An error class may also say it describes the request (a missing instance, a refusal,
        # no valid host): logged at its level without a traceback, and not counted as a fault.
        level = getattr(exc, "rpc_log_level", None)
        if isinstance(own, str) and own:
            outcome = own
        elif isinstance(exc, _CLIENT_ERRORS) or level in _REQUEST_ERROR_LEVELS:
            outcome = "client_error"
        else:
            outcome = "error"
        self._stats.record(label, outcome)
        if not expected and isinstance(exc, _CLIENT_ERRORS):
            log.warning(
                "rpc_request_rejected", error=f"{type(exc).__name__}: {exc}", cast=reply is None
            )
        elif not expected and level in _REQUEST_ERROR_LEVELS:
            log.log(
                _REQUEST_ERROR_LEVELS[level],
                "rpc_request_failed",
                method=label,
                error=f"{type(exc).__name__}: {exc}",
                cast=reply is None,
            )
        elif not expected:
            log.error("rpc_handler_failed", cast=reply is None, exc_info=exc)
        if reply is not None:
            await self._send_failure(reply, exc)

    async def _refuse(
        self,
        reply: _Reply | None,
        label: str,
        exc: Exception,
        heartbeat: asyncio.Task[None] | None,
    ) -> None:
        """The authorizer raised: the request is refused either way (fail closed)."""
        if heartbeat is not None:
            heartbeat.cancel()
        if is_refusal(exc):
            # A policy decision: the authorizer wrote the audit line.
            self._stats.record(label, "forbidden")
        else:
            self._stats.record(label, "error")
            log.error("rpc_authorizer_failed", cast=reply is None, exc_info=exc)
        if reply is not None:
            await self._send_failure(reply, exc)

    async def _refuse_unreadable(
        self, delivery: Delivery, exc: MessageTooLarge | MessageTooDeep
    ) -> None:
        """A request too large or too deep to decode: one short log line (never the body), and
        an error reply when a reply address is found cheaply and the sender is known."""
        reason = "too_large" if isinstance(exc, MessageTooLarge) else "too_deep"
        self._stats.dropped[reason] += 1
        reply = None
        if not (self.require_user_id and not delivery.user_id):
            address = reply_address(delivery.body)
            if address is not None:
                reply = _Reply.from_message({"_reply_q": address[0], "_msg_id": address[1]})
        log.warning(
            "rpc_message_refused",
            reason=reason,
            size=len(delivery.body),
            limit=exc.limit,
            queue=delivery.queue,
            caller=delivery.user_id,
            replied=reply is not None,
        )
        if reply is not None:
            await self._send_failure(reply, exc)

    async def _refuse_unauthenticated(self, delivery: Delivery, reply: _Reply | None) -> None:
        self._stats.dropped["no_user_id"] += 1
        log.warning(
            "rpc_request_refused",
            reason="no_user_id",
            queue=delivery.queue,
            replied=reply is not None,
        )
        if reply is not None:
            await self._send_failure(reply, Unauthenticated())

    async def _send_failure(self, reply: _Reply, exc: BaseException) -> None:
        body = codec.encode_message(
            {
                "result": None,
                "failure": codec.serialize_remote_exception(exc),
                "ending": True,
                "_msg_id": reply.msg_id,
                "_unique_id": new_id(),
            }
        )
        await self._publish_reply(reply, body)

    async def _publish_reply(self, reply: _Reply, body: bytes) -> None:
        await self._replies.send(reply.queue, reply.msg_id, body)

    async def _heartbeat(self, reply: _Reply, interval: float) -> None:
        body_fields = {"result": None, "failure": None, "ending": False, "_msg_id": reply.msg_id}
        while True:
            await asyncio.sleep(interval)
            await self._publish_reply(
                reply, codec.encode_message({**body_fields, "_unique_id": new_id()})
            )


def _wants_heartbeat(client_timeout: Any) -> bool:
    # Only a numeric _timeout >= 2 (oslo: int(_timeout) / 2 >= 1) asks for call-monitor
    # heartbeats; an oslo caller that did not ask crashes on one.
    if isinstance(client_timeout, bool) or not isinstance(client_timeout, (int, float)):
        return False
    try:
        return int(client_timeout) >= 2
    except (OverflowError, ValueError):
        return False
