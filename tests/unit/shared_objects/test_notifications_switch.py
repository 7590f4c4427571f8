"""``[notifications] enabled``: off, an agent publishes nothing and declares no queue."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from shared_objects.context import RequestContext
from shared_objects.notifications import InstanceNotifier
from shared_objects.runtime.config import FleetConfig, MessagingConfig, load_config
from shared_objects.runtime.messaging import MemoryBroker, get_transport


class _Instance(SimpleNamespace):
    def obj_attr_is_set(self, name: str) -> bool:
        return hasattr(self, name)


@pytest.mark.parametrize("enabled", [True, False])
async def test_switch_decides_whether_anything_reaches_the_broker(enabled: bool) -> None:
    broker = MemoryBroker()
    cfg = MessagingConfig(transport_url="memory://fleet-host-h1@unit/")
    async with get_transport(cfg, memory_broker=broker) as transport:
        notifier = InstanceNotifier(transport, "compute.h1", enabled=enabled)
        await notifier.emit(RequestContext(), _Instance(uuid="i-1"), "instance.create.end")
        await notifier.emit(RequestContext(), _Instance(uuid="i-1"), "instance.create.error")
        declared = {q for q in broker.queues if q.startswith("versioned_notifications.")}
        if enabled:
            assert declared == {"versioned_notifications.info", "versioned_notifications.error"}
            assert broker.message_count("versioned_notifications.info") == (1, 0)
            assert notifier.notifier.sent == 2
        else:
            assert declared == set()
            assert notifier.notifier.sent == 0


def test_the_option_is_read_from_the_environment() -> None:
    assert FleetConfig().notifications.enabled is True
    cfg = load_config(environ={"FLEET_NOTIFICATIONS__ENABLED": "false"})
    assert cfg.notifications.enabled is False
