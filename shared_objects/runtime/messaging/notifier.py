"""oslo ``messagingv2`` notifications: enveloped, control exchange, ``<topic>.<priority>``."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

from shared_objects.context import RequestContext
from shared_objects.runtime.messaging import codec
from shared_objects.runtime.messaging.serializer import NoOpSerializer, Serializer
from shared_objects.runtime.messaging.topology import QueueSpec

if TYPE_CHECKING:
    from shared_objects.runtime.messaging.transport import Transport

log = structlog.get_logger(__name__)

PRIORITIES = ("audit", "debug", "info", "warn", "error", "critical", "sample")


class Notifier:
    """Publishes notifications (at-most-once, no reply), like oslo's ``messagingv2`` driver.

    The publisher declares the queue ``<topic>.<priority>`` (as oslo does) so notifications sent
    before any listener exists are kept.
    """

    def __init__(
        self,
        transport: Transport,
        publisher_id: str,
        *,
        topics: Sequence[str] = ("notifications",),
        serializer: Serializer | None = None,
    ):
        self.transport = transport
        self.publisher_id = publisher_id
        self.topics = tuple(topics)
        self.serializer = serializer if serializer is not None else NoOpSerializer()
        self._declared: set[str] = set()
        self.sent = 0

    def prepare(self, publisher_id: str | None = None) -> Notifier:
        """A notifier sharing this one's options with another ``publisher_id``."""
        other = Notifier(
            self.transport,
            publisher_id or self.publisher_id,
            topics=self.topics,
            serializer=self.serializer,
        )
        other._declared = self._declared
        return other

    async def notify(
        self, ctxt: RequestContext | None, event_type: str, payload: Any, priority: str
    ) -> None:
        """Send one notification on every topic."""
        priority = priority.lower()
        if priority == "warning":
            priority = "warn"
        if priority not in PRIORITIES:
            raise ValueError(f"unknown notification priority {priority!r}")
        ctx = ctxt if ctxt is not None else RequestContext()
        message: dict[str, Any] = {
            "message_id": str(uuid.uuid4()),
            "publisher_id": self.publisher_id,
            "event_type": event_type,
            "priority": priority.upper(),
            "payload": await self.serializer.serialize_entity(ctx, payload),
            "timestamp": str(datetime.datetime.now(datetime.UTC).replace(tzinfo=None)),
            "_unique_id": uuid.uuid4().hex,
        }
        if ctxt is not None:
            message.update(codec.pack_context(ctxt))
        body = codec.encode_message(message)
        topology = self.transport.topology
        exchange = topology.control_exchange()
        for topic in self.topics:
            routing_key = f"{topic}.{priority}"
            if routing_key not in self._declared:
                spec: QueueSpec = topology.notification_queue(exchange, routing_key)
                await self.transport.driver.declare([spec])
                self._declared.add(routing_key)
            await self.transport.driver.publish(exchange, routing_key, body)
            self.sent += 1

    async def audit(self, ctxt: RequestContext | None, event_type: str, payload: Any) -> None:
        await self.notify(ctxt, event_type, payload, "audit")

    async def debug(self, ctxt: RequestContext | None, event_type: str, payload: Any) -> None:
        await self.notify(ctxt, event_type, payload, "debug")

    async def info(self, ctxt: RequestContext | None, event_type: str, payload: Any) -> None:
        await self.notify(ctxt, event_type, payload, "info")

    async def warn(self, ctxt: RequestContext | None, event_type: str, payload: Any) -> None:
        await self.notify(ctxt, event_type, payload, "warn")

    warning = warn

    async def error(self, ctxt: RequestContext | None, event_type: str, payload: Any) -> None:
        await self.notify(ctxt, event_type, payload, "error")

    async def critical(self, ctxt: RequestContext | None, event_type: str, payload: Any) -> None:
        await self.notify(ctxt, event_type, payload, "critical")

    async def sample(self, ctxt: RequestContext | None, event_type: str, payload: Any) -> None:
        await self.notify(ctxt, event_type, payload, "sample")
