"""Declarations match oslo.messaging's rabbit driver for the same options, and URL parsing."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest

from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging.topology import (
    DEFAULT_EXCHANGE,
    REPLY_EXCHANGE,
    Topology,
    reply_route,
)
from shared_objects.runtime.messaging.urls import parse_transport_url

OPTION_SETS = [
    dict(
        zip(
            ("amqp_durable_queues", "rabbit_quorum_queue", "rabbit_transient_quorum_queue", "ttl"),
            combo,
            strict=True,
        )
    )
    for combo in itertools.product([False, True], [False, True], [False, True], [0, 1800])
]


def _oslo_args(quorum: bool, ttl: int) -> dict[str, Any]:
    from oslo_messaging._drivers.impl_rabbit import QuorumMemConfig, _get_queue_arguments

    return dict(_get_queue_arguments(False, ttl, quorum, QuorumMemConfig(0, 0, 0), False))


@pytest.mark.parametrize("options", OPTION_SETS)
def test_queue_and_exchange_declarations_equal_oslos(options: dict[str, Any]) -> None:
    config = MessagingConfig(
        amqp_durable_queues=options["amqp_durable_queues"],
        rabbit_quorum_queue=options["rabbit_quorum_queue"],
        rabbit_transient_quorum_queue=options["rabbit_transient_quorum_queue"],
        rabbit_transient_queues_ttl=options["ttl"],
    )
    topology = Topology(config)
    durable = (
        options["amqp_durable_queues"] or options["rabbit_quorum_queue"]
    )  # oslo Connection.durable
    transient_q = options["rabbit_transient_quorum_queue"]

    exchange = topology.control_exchange()
    assert (exchange.name, exchange.type, exchange.durable, exchange.auto_delete) == (
        "fleet",
        "topic",
        durable,
        False,
    )

    topic = topology.topic_queue(exchange, "compute")
    assert (topic.name, topic.routing_key, topic.durable, topic.auto_delete) == (
        "compute",
        "compute",
        durable,
        False,
    )
    assert topic.arguments_dict == _oslo_args(
        options["rabbit_quorum_queue"], 0
    )  # declare_topic_consumer: no TTL

    fanout = topology.fanout_queue("compute", "host-1")
    # oslo: compute_fanout_<uuid hex>; Fleet puts the server in (per-host permission regexes).
    assert re.fullmatch(r"compute_fanout_host-1_[0-9a-f]{32}", fanout.name), fanout.name
    assert (fanout.durable, fanout.auto_delete, fanout.routing_key) == (
        transient_q,
        False,
        "compute",
    )
    assert fanout.arguments_dict == _oslo_args(transient_q, options["ttl"])
    assert fanout.exchange is not None
    assert (fanout.exchange.name, fanout.exchange.type) == ("compute_fanout", "fanout")
    assert (fanout.exchange.durable, fanout.exchange.auto_delete) == (transient_q, True)
    assert not fanout.exclusive

    reply = topology.reply_queue("fleet-host-h1")
    assert re.fullmatch(r"reply_fleet-host-h1_[0-9a-f]{32}", reply.name), reply.name
    # Bound to Fleet's reply exchange under its own name (per-login topic permissions).
    assert reply.exchange == REPLY_EXCHANGE
    assert (REPLY_EXCHANGE.name, REPLY_EXCHANGE.type) == ("fleet_reply", "topic")
    assert reply.routing_key == reply.name
    assert (reply.durable, reply.auto_delete) == (transient_q, False)
    assert reply.arguments_dict == _oslo_args(transient_q, options["ttl"])
    # Exclusive to its connection, except as a quorum queue (which cannot be exclusive).
    assert reply.exclusive is not transient_q

    notify = topology.notification_queue(exchange, "notifications.info")
    assert (notify.name, notify.durable, notify.auto_delete) == (
        "notifications.info",
        durable,
        False,
    )
    assert notify.arguments_dict == _oslo_args(options["rabbit_quorum_queue"], 0)


def test_rabbit_url_with_several_hosts_and_vhost() -> None:
    parsed = parse_transport_url(
        "rabbit://a:pw@h1:5672,b:pw2@h2:5673/vh?kombu_failover_strategy=x", heartbeat=7
    )
    assert parsed.scheme == "amqp"
    assert parsed.hosts == (
        "amqp://a:pw@h1:5672/vh?heartbeat=7",
        "amqp://b:pw2@h2:5673/vh?heartbeat=7",
    )
    assert parsed.users == ("a", "b")
    assert parsed.virtual_host == "vh"


def test_tls_from_scheme_or_ssl_option_and_url_heartbeat_wins() -> None:
    assert parse_transport_url("amqps://u:p@h/").hosts == ("amqps://u:p@h/",)
    assert parse_transport_url("rabbit://u:p@h/?ssl=1&heartbeat=3", heartbeat=9).hosts == (
        "amqps://u:p@h/?heartbeat=3",
    )


def test_quoted_user_is_unquoted_for_user_id() -> None:
    assert parse_transport_url("rabbit://host%401:p@h/").users == ("host@1",)


def test_memory_url() -> None:
    parsed = parse_transport_url("memory://alice@unit/")
    assert (parsed.scheme, parsed.hosts, parsed.users) == ("memory", ("unit",), ("alice",))
    assert parse_transport_url("memory://").users == ("guest",)


def test_unknown_scheme_is_rejected() -> None:
    with pytest.raises(ValueError):
        parse_transport_url("kafka://h/")


def test_queue_names_are_fresh_and_unpredictable_per_call() -> None:
    topology = Topology(MessagingConfig())
    names = {topology.reply_queue("u").name for _ in range(100)}
    names |= {topology.fanout_queue("t", "s").name for _ in range(100)}
    assert len(names) == 200
    # Without a login (a URL naming no user) the login part is left out.
    assert re.fullmatch(r"reply_[0-9a-f]{32}", topology.reply_queue("").name)


def test_replies_route_by_queue_name_and_only_to_reply_queues() -> None:
    hex32 = "0123456789abcdef" * 2
    fleet = f"reply_fleet-host-h1.example.com_{hex32}"
    assert reply_route(fleet) == (REPLY_EXCHANGE, fleet)
    # oslo.messaging peers (and Fleet before 1.2): through the default exchange.
    assert reply_route(f"reply_{hex32}") == (DEFAULT_EXCHANGE, f"reply_{hex32}")
    # A caller naming another queue as its reply queue gets no reply there.
    for name in ("conductor", "compute.h2", f"compute_fanout_h2_{hex32}", "reply_x", ""):
        assert reply_route(name) is None, name
    # Without a login the queue stays on the default exchange only.
    assert Topology(MessagingConfig()).reply_queue("").exchange is None
