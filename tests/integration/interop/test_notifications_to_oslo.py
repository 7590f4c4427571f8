"""An unmodified oslo.messaging notification listener receives Fleet notifications (messagingv2)."""

from __future__ import annotations

from typing import Any

import pytest

from shared_objects.context import RequestContext
from shared_objects.runtime.messaging import Notifier, Transport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


async def test_oslo_listener_receives_fleet_notifications_by_priority(
    start_oslo_peer: Any, fleet_transport: Transport, topic: str, delete_test_queues: list[str]
) -> None:
    delete_test_queues.extend(f"{topic}.{priority}" for priority in ("info", "warn", "error"))
    listener = await start_oslo_peer("listener")
    notifier = Notifier(fleet_transport, "compute.host1", topics=[topic])
    ctxt = RequestContext(user_id="alice", project_id="p1", request_id="req-n1")
    payload = {"instance_id": "6f1c7a3e", "state": "active", "sizes": [1, 2, 3]}

    await notifier.info(ctxt, "compute.instance.create.end", payload)
    await notifier.prepare(publisher_id="compute.host2").error(ctxt, "compute.instance.fail", {})

    info = await listener.wait_event(lambda e: e.get("priority") == "info", within=15)
    assert info["publisher_id"] == "compute.host1"
    assert info["event_type"] == "compute.instance.create.end"
    assert info["payload"] == payload
    assert info["ctxt"]["user"] == "alice"
    assert info["ctxt"]["request_id"] == "req-n1"
    assert info["metadata"]["message_id"]
    assert info["metadata"]["timestamp"]

    error = await listener.wait_event(lambda e: e.get("priority") == "error", within=15)
    assert (error["publisher_id"], error["event_type"]) == (
        "compute.host2",
        "compute.instance.fail",
    )
    assert len([e for e in listener.events if e.get("event") == "notification"]) == 2
