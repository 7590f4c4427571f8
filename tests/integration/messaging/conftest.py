"""Fixtures for the messaging integration tests that need several broker logins.

The logins come from the shared test kit (``shared_objects.testing.broker_logins``) through the
session fixture ``broker_logins`` of ``tests/conftest.py``: agents ``fleet-host-<tag>-<host>``
with the per-host permissions a deployment gives them (own ``compute.<host>``, own
``reply_<login>_<hex>`` and ``compute_fanout_<host>_<hex>`` queues), conductors with full rights,
random passwords, all deleted at the end of the session.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import Transport, get_transport
from shared_objects.runtime.messaging.urls import parse_transport_url
from shared_objects.testing.broker_logins import BrokerLogins

MakeTransport = Callable[[str], Transport]


@pytest.fixture
def logins(broker_logins: BrokerLogins | None) -> BrokerLogins:
    """The session's broker logins (skips where the session has no private vhost)."""
    if broker_logins is None:
        pytest.skip("needs rabbitmqctl and a private vhost for per-host broker logins")
    return broker_logins


@pytest.fixture
def amqp_url_for(logins: BrokerLogins) -> Callable[[str], str]:
    """The aio-pika (amqp://) URL logging in as ``login``, for raw connections in tests."""

    def url(login: str) -> str:
        return parse_transport_url(logins.url_for(login)).hosts[0]

    return url


@pytest.fixture
async def transport_as(logins: BrokerLogins, control_exchange: str) -> AsyncIterator[MakeTransport]:
    """``transport_as(login)``: a Fleet transport (not connected yet) logging in as ``login``;
    every transport made is closed at the end of the test."""
    made: list[Transport] = []

    def make(login: str) -> Transport:
        config = MessagingConfig(
            transport_url=logins.url_for(login), control_exchange=control_exchange
        )
        transport = get_transport(config)
        made.append(transport)
        return transport

    try:
        yield make
    finally:
        for transport in made:
            await transport.close()
