"""Messaging settings for parties on one in-memory broker, each logged in as its own user.

On a ``memory://login@broker`` URL the broker stamps every message with ``login`` as its
validated ``user_id``, as RabbitMQ does, so authorisation is exercised without a broker.
"""

from __future__ import annotations

import dataclasses
import uuid

from shared_objects.runtime.config import MessagingConfig


def memory_messaging(name: str | None = None) -> MessagingConfig:
    """Messaging settings for a private in-memory broker with a control exchange of its own."""
    return MessagingConfig(
        transport_url=f"memory://{name or uuid.uuid4().hex}",
        control_exchange=f"fleet-local-{uuid.uuid4().hex[:8]}",
    )


def broker_name(messaging: MessagingConfig) -> str:
    """The in-memory broker a ``memory://[login@]name`` URL names."""
    return messaging.transport_url.removeprefix("memory://").rpartition("@")[2]


def as_login(messaging: MessagingConfig, login: str) -> MessagingConfig:
    """``messaging`` on the same in-memory broker, logged in as ``login``."""
    url = f"memory://{login}@{broker_name(messaging)}"
    return dataclasses.replace(messaging, transport_url=url)
