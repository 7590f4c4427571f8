"""Versioned notifications: what operators' tooling listens to on ``versioned_notifications``.

Payloads are versioned primitives in the same envelope o.vo uses (``fleet_object.name``,
``.version``, ``.data``), so listeners can check the version they understand.
"""

from __future__ import annotations

from typing import Any

from shared_objects.context import RequestContext
from shared_objects.runtime.messaging import Notifier, Transport

TOPIC = "versioned_notifications"

# InstanceActionPayload history:
# 1.0: Initial version
INSTANCE_ACTION_PAYLOAD_VERSION = "1.0"

_INSTANCE_FIELDS = (
    "uuid",
    "name",
    "host",
    "node",
    "vm_state",
    "task_state",
    "power_state",
    "user_id",
    "project_id",
    "vcpus",
    "memory_mb",
    "root_gb",
    "image_ref",
)


def _value(obj: Any, name: str) -> Any:
    if not obj.obj_attr_is_set(name):
        return None
    value = getattr(obj, name)
    return value.isoformat() if hasattr(value, "isoformat") else value


def instance_action_payload(
    instance: Any, *, fault: str | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The payload of ``instance.<action>.<phase>`` notifications."""
    data = {name: _value(instance, name) for name in _INSTANCE_FIELDS}
    data["launched_at"] = _value(instance, "launched_at")
    data["fault"] = fault
    if extra:
        data.update(extra)
    return {
        "fleet_object.name": "InstanceActionPayload",
        "fleet_object.namespace": "fleet",
        "fleet_object.version": INSTANCE_ACTION_PAYLOAD_VERSION,
        "fleet_object.data": data,
    }


class InstanceNotifier:
    """Emits ``instance.*`` versioned notifications for one service.

    ``enabled=False`` (``[notifications] enabled = false``): every emit is a no-op; nothing is
    published and no notification queue is declared.
    """

    def __init__(self, transport: Transport, publisher_id: str, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.notifier = Notifier(transport, publisher_id, topics=(TOPIC,))

    async def emit(
        self,
        ctxt: RequestContext,
        instance: Any,
        event_type: str,
        *,
        fault: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if not self.enabled:
            return
        payload = instance_action_payload(instance, fault=fault, extra=extra)
        if event_type.endswith(".error"):
            await self.notifier.error(ctxt, event_type, payload)
        else:
            await self.notifier.info(ctxt, event_type, payload)
