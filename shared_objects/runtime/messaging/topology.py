"""Exchange and queue declarations, argument-identical to oslo.messaging's rabbit driver.

A declaration that differs from an existing one by a single flag or argument makes RabbitMQ close
the channel with 406 PRECONDITION_FAILED, so every name and argument here follows
``oslo_messaging/_drivers/impl_rabbit.py`` (``Consumer``, ``declare_*_consumer``, ``*_send``)
for the same option values. Options carry oslo's names; see ``MessagingConfig``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging.ids import new_id

ExchangeType = Literal["topic", "fanout", "direct"]


@dataclasses.dataclass(frozen=True, slots=True)
class ExchangeSpec:
    """An exchange to declare (the default exchange ``""`` is never declared)."""

    name: str
    type: ExchangeType = "topic"
    durable: bool = False
    auto_delete: bool = False


DEFAULT_EXCHANGE = ExchangeSpec("", "direct")

#: Where Fleet's replies travel: a topic exchange (RabbitMQ checks topic permissions on topic
#: exchanges only) to which every ``reply_<login>_<hex>`` queue is bound with its own name as the
#: binding key. Per-login topic permissions then say which reply queues a login may bind (its
#: own) and publish to, and no login needs write on the default exchange, which reaches ANY queue
#: by name. One fixed name, independent of ``control_exchange`` and ``Target.exchange``: a reply
#: reaches the caller whatever exchange the call went through. Durable, never auto-deleted
#: (``fleetctl broker setup`` may create it ahead with the same flags).
REPLY_EXCHANGE = ExchangeSpec("fleet_reply", "topic", durable=True, auto_delete=False)

# Reply queues of peers that have no login in the name (oslo.messaging, Fleet before 1.2): they
# are reached through the default exchange, as oslo does.
_LEGACY_REPLY_QUEUE = re.compile(r"reply_[0-9a-f]{32}")
_FLEET_REPLY_QUEUE = re.compile(r"reply_[^_\s]+_[0-9a-f]{32}")


def reply_route(queue: str) -> tuple[ExchangeSpec, str] | None:
    """Where a reply to the reply queue ``queue`` is published, or None: not a reply queue.

    ``reply_<login>_<32 hex>`` (Fleet): the reply exchange, routing key = the queue name.
    ``reply_<32 hex>`` (oslo.messaging peers, Fleet before 1.2): the default exchange. Anything
    else is no reply queue, and a server never publishes to it: a caller cannot make a server
    drop its reply into some other queue (``conductor``, ``compute.<host>``) by naming it.
    """
    if _FLEET_REPLY_QUEUE.fullmatch(queue):
        return REPLY_EXCHANGE, queue
    if _LEGACY_REPLY_QUEUE.fullmatch(queue):
        return DEFAULT_EXCHANGE, queue
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class QueueSpec:
    """A queue to declare, with the exchange it is bound to (if any) and its binding key.

    ``exclusive``: only the declaring connection may use (consume, declare, delete) the queue,
    and the broker deletes it when that connection closes.
    """

    name: str
    durable: bool = False
    auto_delete: bool = False
    arguments: tuple[tuple[str, Any], ...] = ()
    exchange: ExchangeSpec | None = None
    routing_key: str = ""
    exclusive: bool = False

    @property
    def arguments_dict(self) -> dict[str, Any]:
        return dict(self.arguments)


class Topology:
    """Names and declaration flags for one transport's options."""

    def __init__(self, config: MessagingConfig):
        self.config = config
        # oslo: Connection.durable = amqp_durable_queues or rabbit_quorum_queue
        self.durable = bool(config.amqp_durable_queues or config.rabbit_quorum_queue)
        self.auto_delete = bool(config.amqp_auto_delete)

    def _args(self, *, quorum: bool, ttl: int) -> tuple[tuple[str, Any], ...]:
        # oslo _get_queue_arguments (no HA queues, no quorum delivery/memory limits, no streams)
        args: dict[str, Any] = {}
        if quorum:
            args["x-queue-type"] = "quorum"
        if ttl > 0:
            args["x-expires"] = ttl * 1000
        return tuple(args.items())

    def control_exchange(self, name: str | None = None) -> ExchangeSpec:
        """The topic exchange calls and casts go to (``Target.exchange`` or the configured one)."""
        return ExchangeSpec(
            name or self.config.control_exchange, "topic", self.durable, self.auto_delete
        )

    def fanout_exchange(self, topic: str) -> ExchangeSpec:
        return ExchangeSpec(
            f"{topic}_fanout", "fanout", bool(self.config.rabbit_transient_quorum_queue), True
        )

    def topic_queue(
        self, exchange: ExchangeSpec, topic: str, queue: str | None = None
    ) -> QueueSpec:
        """``<topic>`` (or ``<topic>.<server>``) bound to the control exchange."""
        return QueueSpec(
            name=queue or topic,
            durable=self.durable,
            auto_delete=self.auto_delete,
            arguments=self._args(quorum=self.config.rabbit_quorum_queue, ttl=0),
            exchange=exchange,
            routing_key=topic,
        )

    def fanout_queue(self, topic: str, server: str) -> QueueSpec:
        """``<topic>_fanout_<server>_<32 hex>``, unique per server, expiring when unused.

        oslo names it ``<topic>_fanout_<uuid hex>``; the server name in the middle lets a
        deployment grant each host's login the fanout queues of its own servers by a regular
        expression. Flags and arguments are oslo's.
        """
        return QueueSpec(
            name=f"{topic}_fanout_{server}_{new_id()}",
            durable=bool(self.config.rabbit_transient_quorum_queue),
            auto_delete=False,
            arguments=self._transient_args(),
            exchange=self.fanout_exchange(topic),
            routing_key=topic,
        )

    def reply_queue(self, login: str) -> QueueSpec:
        """``reply_<login>_<32 hex>``: one per transport, bound to :data:`REPLY_EXCHANGE`.

        Named after the caller's broker login (per-login permissions can then be written as
        regular expressions), bound to the reply exchange with its own name as the key, and
        exclusive to the connection that declares it, so no other connection can consume it.
        Quorum queues cannot be exclusive: with ``rabbit_transient_quorum_queue`` the reply
        queue is a non-exclusive quorum queue. Without a login: ``reply_<32 hex>`` on the
        default exchange only (oslo's).
        """
        quorum = bool(self.config.rabbit_transient_quorum_queue)
        name = f"reply_{login}_{new_id()}" if login else f"reply_{new_id()}"
        return QueueSpec(
            name=name,
            durable=quorum,
            auto_delete=False,
            arguments=self._transient_args(),
            exclusive=not quorum,
            exchange=REPLY_EXCHANGE if login else None,
            routing_key=name if login else "",
        )

    def _transient_args(self) -> tuple[tuple[str, Any], ...]:
        return self._args(
            quorum=self.config.rabbit_transient_quorum_queue,
            ttl=self.config.rabbit_transient_queues_ttl,
        )

    def notification_queue(self, exchange: ExchangeSpec, routing_key: str) -> QueueSpec:
        """``<topic>.<priority>``, declared by the publisher: nothing is lost before a listener."""
        return QueueSpec(
            name=routing_key,
            durable=exchange.durable,
            auto_delete=exchange.auto_delete,
            arguments=self._args(quorum=self.config.rabbit_quorum_queue, ttl=0),
            exchange=exchange,
            routing_key=routing_key,
        )
