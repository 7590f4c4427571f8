"""The build flow on the conductor: validate, schedule, create the records, hand off to agents.

``build_instances`` checks the whole request before writing anything (unknown flavor, bad count,
unknown forced host or security group: a clear error, nothing changed), creates every instance in
one unit of work (``building``/``scheduling``, an InstanceAction ``create``, its block device
mappings), then casts ``run_instance`` to each chosen agent. An agent whose build fails hands the
instance back through ``reschedule_instance``; after ``max_attempts`` or when no host is left the
instance goes to ERROR with a fault that says why.

When every live agent speaks compute RPC 1.2, the unit of work that places an attempt (the
request's, or the reschedule's) also records its ``compute_run_instance`` event start, and the
cast carries the BDMs (``conductor.tasks.build_extras``): the agent then makes two fewer object
calls per build. The security group rules are not sent along: the agent reads them once it
has taken the instance, so that a rule change from then on reaches the build (see
``conductor.tasks.security_groups``), which a snapshot taken here could miss.
"""

from __future__ import annotations

import asyncio
from typing import Any

from conductor.scheduler import HostState, ResourceRequest
from conductor.tasks.build_extras import BuildExtras, bdm_list
from conductor.tasks.build_placement import _invalid, _Record
from conductor.tasks.build_recovery import BuildRecovery
from conductor.tasks.faults import set_instance_error
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.exception import NoValidHost
from shared_objects.fields import BDMDestinationType, BDMSourceType, TaskState, VMState
from shared_objects.objects.block_device_mapping import BlockDeviceMapping
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.instance import Instance
from shared_objects.objects.instance_action import InstanceAction
from shared_objects.objects.security_group import SecurityGroup, SecurityGroupList

MAX_COUNT = 1000


def _check_bdms(bdms: Any) -> list[dict[str, Any]]:
    if bdms is None:
        return []
    if not isinstance(bdms, list) or not all(isinstance(b, dict) for b in bdms):
        raise _invalid("block_device_mappings must be a list of objects")
    for bdm in bdms:
        if not isinstance(bdm.get("volume_id"), str) or not bdm["volume_id"]:
            raise _invalid("each block device mapping needs a volume_id")
    return bdms


async def find_flavor(ctxt: Any, ref: str) -> Flavor:
    """A flavor by name, or by flavor id when no flavor has that name."""
    try:
        return await Flavor.get_by_name(ctxt, ref)
    except exception.FlavorNotFound:
        return await Flavor.get_by_flavor_id(ctxt, ref)


class BuildTask(BuildRecovery):
    """Conductor side of booting instances."""

    async def build_instances(
        self,
        ctxt: RequestContext,
        *,
        flavor: str,
        name: str,
        image_ref: str = "fake-image",
        count: int = 1,
        security_groups: list[str] | None = None,
        block_device_mappings: list[dict[str, Any]] | None = None,
        forced_host: str | None = None,
    ) -> list[dict[str, Any]]:
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
            raise _invalid(f"count must be a whole number from 1 to {MAX_COUNT}, got {count!r}")
        if not isinstance(name, str) or not name.strip():
            raise _invalid("a name is required")
        if not isinstance(flavor, str) or not flavor:
            raise _invalid("a flavor is required")
        bdms = _check_bdms(block_device_mappings)
        if bdms and count > 1:
            raise _invalid("volumes can be attached at boot only to a single instance")

        async with self.database.request(ctxt):
            the_flavor = await find_flavor(ctxt, flavor)
            groups = [
                await SecurityGroup.get_by_name(ctxt, ctxt.project_id or "", g)
                for g in (security_groups or [])
            ]
            req = ResourceRequest(the_flavor.vcpus, the_flavor.memory_mb, the_flavor.root_gb)
            picks: list[list[HostState]] = []
            no_host: NoValidHost | None = None
            try:
                picks = await self._schedule(ctxt, req, count, force_host=forced_host)
            except NoValidHost as exc:
                no_host = exc
            # Each instance is assigned to its host in the same statement that creates it: the
            # agent may take only a build assigned to it (its ownership scope says so).
            assigned: list[str | None] = (
                [p[0].host for p in picks] if no_host is None else [None] * count
            )
            records = await self._create_records(
                ctxt, the_flavor, name, image_ref, count, groups, bdms, assigned
            )
            instances = [r.instance for r in records]
            extras: list[BuildExtras | None] = [None] * count
            if no_host is not None:
                for inst in instances:
                    await set_instance_error(ctxt, inst, str(no_host), code=503)
            else:
                # In this unit of work: the event starts commit with the records they belong to.
                extras = await self._extras_for_request(ctxt, records, picks)

        if no_host is None:
            await asyncio.gather(
                *(
                    self._cast_build(
                        ctxt, inst, [h.host for h in pick], attempt=1, tried=[], extras=extra
                    )
                    for inst, pick, extra in zip(instances, picks, extras, strict=True)
                )
            )
        return [{"uuid": i.uuid, "name": i.name} for i in instances]

    async def _create_records(
        self,
        ctxt: RequestContext,
        flavor: Flavor,
        name: str,
        image_ref: str,
        count: int,
        groups: list[SecurityGroup],
        bdms: list[dict[str, Any]],
        hosts: list[str | None],
    ) -> list[_Record]:
        """Each new instance, assigned to its host, with the BDMs and the action created for it
        (kept for the cast)."""
        records: list[_Record] = []
        for index in range(count):
            inst = Instance(
                ctxt,
                host=hosts[index],
                name=name if count == 1 else f"{name}-{index + 1}",
                user_id=ctxt.user_id,
                project_id=ctxt.project_id,
                vm_state=VMState.BUILDING,
                task_state=TaskState.SCHEDULING,
                power_state=None,
                image_ref=image_ref,
                flavor=flavor,
                launch_index=index,
                progress=0,
                security_groups=SecurityGroupList(ctxt, objects=groups),
            )
            await inst.create()
            action = await InstanceAction.action_start(ctxt, inst.uuid, "create")
            created: list[BlockDeviceMapping] = []
            for bdm in bdms:
                mapping = BlockDeviceMapping(
                    ctxt,
                    instance_uuid=inst.uuid,
                    source_type=BDMSourceType.VOLUME,
                    destination_type=BDMDestinationType.VOLUME,
                    volume_id=bdm["volume_id"],
                    device_name=bdm.get("device_name"),
                    boot_index=None,
                    delete_on_termination=False,
                )
                await mapping.create()
                created.append(mapping)
            records.append(_Record(inst, bdm_list(ctxt, created), action.id))
        return records

    async def reschedule_instance(
        self,
        ctxt: RequestContext,
        *,
        instance_uuid: str,
        failed_host: str,
        reason: str,
        request_spec: dict[str, Any],
        allow_unassigned: bool = True,
    ) -> None:
        """Place a build that failed on ``failed_host`` somewhere else, or put it in ERROR.

        The agent hands the build back still assigned to itself (``host`` = ``failed_host``,
        ``scheduling``), which proves it was its build. Agents of releases before 1.2 clear the
        host instead; ``allow_unassigned`` accepts that (conductors, operators and the legacy
        shared login only: an unassigned build proves nothing about who asks)."""
        tried = [h for h in request_spec.get("tried_hosts", []) if isinstance(h, str)]
        if failed_host not in tried:
            tried.append(failed_host)
        attempt = int(request_spec.get("attempt", 1))
        async with self.database.request(ctxt):
            instance = await Instance.get_by_uuid(ctxt, instance_uuid)
            handed_back = instance.host == failed_host or (
                allow_unassigned and instance.host is None
            )
            if instance.task_state != TaskState.SCHEDULING or not handed_back:
                # The agent must hand the instance back first (still assigned to it, waiting
                # to be scheduled): anything else means someone else owns it now.
                raise _invalid(
                    f"instance {instance_uuid} is not waiting to be rescheduled "
                    f"(task_state={instance.task_state}, host={instance.host})"
                )
            # No host keeps a failed build: it is unassigned whatever happens next.
            instance.host = None
            instance.node = None
            if attempt >= self.settings.max_attempts:
                await set_instance_error(
                    ctxt,
                    instance,
                    f"Exceeded maximum number of build attempts ({self.settings.max_attempts}). "
                    f"Last failure on {failed_host}: {reason}",
                    host=failed_host,
                )
                return
            req = ResourceRequest(instance.vcpus, instance.memory_mb, instance.root_gb)
            try:
                picks = await self._schedule(ctxt, req, 1, ignore_hosts=tried)
            except NoValidHost as exc:
                await set_instance_error(
                    ctxt,
                    instance,
                    f"{exc} Build failed on {failed_host}: {reason}",
                    code=503,
                    host=failed_host,
                )
                return
            # Assign it to the new host before the cast (the CAS fails if a delete took it).
            instance.host = picks[0][0].host
            instance.node = None
            await instance.save(expected_task_state=[TaskState.SCHEDULING])
            extras = None
            if self.compute.can_send_build_extras(picks[0][0].host):
                extras = await self._extras_for_reschedule(ctxt, instance, picks[0][0].host)
        await self._cast_build(
            ctxt,
            instance,
            [h.host for h in picks[0]],
            attempt=attempt + 1,
            tried=tried,
            extras=extras,
        )
