"""What the conductor hands an agent along with ``run_instance`` at compute RPC >= 1.2.

An agent used to open every build with object calls back to the conductor for the instance's
block device mappings and the ``compute_run_instance`` event start. The conductor has both at
hand in the unit of work that places the instance: it keeps the BDMs it has just created (a
reschedule reads them) and records the event start in the same transaction. The security group
rules stay the agent's to read, after it has taken the instance (``conductor.tasks.build``).
Everything here runs only when the receiving agent speaks 1.2; below that the agent does the
work itself, as release 1.0 agents always do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import structlog

from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.objects.block_device_mapping import BlockDeviceMapping, BlockDeviceMappingList
from shared_objects.objects.instance_action_event import InstanceActionEvent

log = structlog.get_logger(__name__)

RUN_EVENT = "compute_run_instance"


@dataclasses.dataclass(frozen=True, slots=True)
class BuildExtras:
    """The optional ``run_instance`` arguments of compute RPC 1.2."""

    block_device_mappings: BlockDeviceMappingList
    event_started: bool


def bdm_list(ctxt: RequestContext, bdms: Iterable[BlockDeviceMapping]) -> BlockDeviceMappingList:
    """BDMs the conductor already holds (it created them) as the list the agent expects."""
    result = BlockDeviceMappingList(ctxt, objects=list(bdms))
    result.obj_reset_changes()
    return result


async def start_run_event(ctxt: RequestContext, instance_uuid: str, host: str) -> bool:
    """Record the start of the build attempt on ``host``; False when the request has no action
    for the instance (then the agent's own ``instance_event`` handles it as it always did)."""
    try:
        await InstanceActionEvent.event_start(ctxt, instance_uuid, RUN_EVENT, host)
    except exception.InstanceActionNotFound:
        log.info("run_event_not_started_no_action", instance_uuid=instance_uuid, host=host)
        return False
    return True
