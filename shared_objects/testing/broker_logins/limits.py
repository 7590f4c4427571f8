"""The broker limits ``fleetctl broker setup`` applies: queue policies and per-user limits."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerLimits:
    """The limits ``fleetctl broker setup`` puts on a Fleet vhost (policies and user limits).

    Sizes in messages and bytes, times in seconds; 0 leaves that limit out.
    """

    #: every RPC queue (``<conductor topic>[.<server>]``, ``compute[.<host>]``): a stopped
    #: agent's backlog stops here, further casts and calls are refused (``overflow`` below).
    rpc_max_length: int = 10_000
    rpc_max_bytes: int = 64 * 1024 * 1024
    #: reply queues: a reply older than the call's timeout is useless to the caller.
    reply_max_length: int = 1_000
    reply_ttl: float = 60.0
    #: fanout queues (``<topic>_fanout_<server>_<hex>``): broadcast casts are refresh notices.
    fanout_max_length: int = 1_000
    fanout_ttl: float = 600.0
    #: ``versioned_notifications.<priority>``: the oldest are dropped first (drop-head), so an
    #: absent listener never makes an agent's work fail; kept for ``notifications_ttl``.
    notifications_max_length: int = 10_000
    notifications_ttl: float = 86_400.0
    #: per-login connection and channel limits (``rabbitmqctl set_user_limits``); conductors
    #: have none.
    agent_max_connections: int = 8
    agent_max_channels: int = 64
    operator_max_connections: int = 8
    operator_max_channels: int = 64


def _policy(
    vhost: str, name: str, pattern: str, priority: int, definition: dict[str, Any]
) -> dict[str, Any]:
    return {
        "vhost": vhost,
        "name": name,
        "pattern": pattern,
        "apply-to": "queues",
        "priority": priority,
        "definition": {k: v for k, v in definition.items() if v},
    }


def _ms(seconds: float) -> int:
    return int(seconds * 1000)
