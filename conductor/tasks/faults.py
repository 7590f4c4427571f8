"""Putting an instance into ERROR with a fault that says why — the one way builds fail."""

from __future__ import annotations

from typing import Any

import structlog

from shared_objects import exception
from shared_objects.fields import VMState
from shared_objects.objects.instance import Instance
from shared_objects.objects.instance_action import InstanceAction
from shared_objects.objects.instance_fault import InstanceFault

log = structlog.get_logger(__name__)


async def set_instance_error(
    ctxt: Any,
    instance: Instance,
    message: str,
    *,
    code: int = 500,
    details: str | None = None,
    host: str | None = None,
) -> None:
    """ERROR, task cleared, a fault recorded and the request's action finished."""
    instance.vm_state = VMState.ERROR
    instance.task_state = None
    await instance.save()
    fault = InstanceFault(
        ctxt,
        instance_uuid=instance.uuid,
        code=code,
        message=message[:255],
        details=details,
        host=host,
    )
    await fault.create()
    try:
        await InstanceAction.action_finish(ctxt, instance.uuid, message="Error")
    except exception.InstanceActionNotFound:
        log.debug("no_action_to_finish", instance_uuid=instance.uuid)
    log.warning("instance_error", instance_uuid=instance.uuid, reason=message)
