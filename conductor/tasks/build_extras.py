"""What the conductor hands an agent along with ``run_instance`` at compute RPC >= 1.2.

An agent used to open every build with three object calls back to the conductor: the instance's
block device mappings, its security group rules, and the ``compute_run_instance`` event start.
The conductor has all three at hand in the unit of work that places the instance, so it loads
(or, for BDMs it has just created, simply keeps) them there and records the event start in the
same transaction. Everything here runs only when every live agent speaks 1.2; below that the
agent does the work itself, as release 1.0 agents always do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import structlog

from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.objects.block_device_mapping import BlockDeviceMapping, BlockDeviceMappingList
from shared_objects.objects.instance_action_event import InstanceActionEvent
from shared_objects.objects.security_group import SecurityGroup
from shared_objects.objects.security_group_rule import SecurityGroupRuleList

log = structlog.get_logger(__name__)

RUN_EVENT = "compute_run_instance"


@dataclasses.dataclass(frozen=True, slots=True)
class BuildExtras:
    """The optional ``run_instance`` arguments of compute RPC 1.2."""

    block_device_mappings: BlockDeviceMappingList
    security_group_rules: SecurityGroupRuleList
    event_started: bool


def bdm_list(ctxt: RequestContext, bdms: Iterable[BlockDeviceMapping]) -> BlockDeviceMappingList:
    """BDMs the conductor already holds (it created them) as the list the agent expects."""
    result = BlockDeviceMappingList(ctxt, objects=list(bdms))
    result.obj_reset_changes()
    return result


async def rules_of_groups(
    ctxt: RequestContext, groups: Iterable[SecurityGroup]
) -> SecurityGroupRuleList:
    """Every rule of ``groups`` in at most one query, whatever the number of instances sharing
    them (all instances of one build request have the same groups)."""
    ids = sorted({g.id for g in groups})
    if not ids:
        empty = SecurityGroupRuleList(ctxt, objects=[])
        empty.obj_reset_changes()
        return empty
    return await SecurityGroupRuleList.get_by_security_group_ids(ctxt, ids)


async def start_run_event(ctxt: RequestContext, instance_uuid: str, host: str) -> bool:
    """Record the start of the build attempt on ``host``; False when the request has no action
    for the instance (then the agent's own ``instance_event`` handles it as it always did)."""
    try:
        await InstanceActionEvent.event_start(ctxt, instance_uuid, RUN_EVENT, host)
    except exception.InstanceActionNotFound:
        log.info("run_event_not_started_no_action", instance_uuid=instance_uuid, host=host)
        return False
    return True
