"""run_instance and terminate_instance on the agent: the build flow after scheduling.

Every state change is a compare-and-swap save with the task state the step expects
(scheduling → block_device_mapping → spawning → None), so a redelivered or duplicated request
finds the instance already moved on and does nothing. A failed build releases its claim, removes
any partial guest and hands the instance back to the conductor to be rescheduled; the conductor
decides between another host and ERROR.
"""

from __future__ import annotations

import datetime
from typing import Any

import structlog

from compute_agent.claims import InsufficientResources
from compute_agent.instance_events import abandon_event, instance_event
from compute_agent.resource_tracker import ResourceTracker
from compute_agent.security_groups import RulesWatch, rules_for_driver
from compute_agent.virt.driver import ComputeDriver
from compute_agent.virt.exceptions import VirtError
from conductor.tasks.rpcapi import ComputeTaskAPI
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.fields import PowerState, TaskState, VMState
from shared_objects.notifications import InstanceNotifier
from shared_objects.objects.block_device_mapping import BlockDeviceMappingList
from shared_objects.objects.instance import Instance
from shared_objects.objects.instance_action import InstanceAction
from shared_objects.objects.instance_fault import InstanceFault
from shared_objects.objects.security_group_rule import SecurityGroupRuleList

log = structlog.get_logger(__name__)

# Failures that mean "this host could not build it": another host may succeed.
RESCHEDULABLE = (InsufficientResources, VirtError)

RUN_EVENT = "compute_run_instance"


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class BuildManager:
    """Builds and deletes instances on this host."""

    def __init__(
        self,
        host: str,
        driver: ComputeDriver,
        tracker: ResourceTracker,
        tasks: ComputeTaskAPI,
        notifier: InstanceNotifier,
        rules_watch: RulesWatch | None = None,
    ) -> None:
        self.host = host
        self.rules_watch = rules_watch if rules_watch is not None else RulesWatch()
        self.driver = driver
        self.tracker = tracker
        self.tasks = tasks
        self.notifier = notifier

    async def run_instance(
        self,
        ctxt: RequestContext,
        instance: Instance,
        request_spec: dict[str, Any],
        alternates: list[str],
        attempt: int,
        *,
        block_device_mappings: BlockDeviceMappingList | None = None,
        event_started: bool = False,
    ) -> None:
        """Build ``instance`` here. A conductor casting at compute RPC >= 1.2 hands over the
        BDMs and has recorded the event start (``event_started``); from an older one neither
        comes, and this agent fetches and records them itself."""
        bound = log.bind(instance_uuid=instance.uuid, attempt=attempt)
        # Take the build: the conductor assigned it to this host (only then may this agent
        # write the row at all), and only a build still waiting to be scheduled can be taken.
        instance.node = self.tracker.nodename
        instance.task_state = TaskState.BLOCK_DEVICE_MAPPING
        try:
            await instance.save(expected_task_state=[TaskState.SCHEDULING])
        except exception.UnexpectedTaskStateError as exc:
            bound.info("build_skipped_not_scheduling", reason=str(exc))
            if event_started:
                await abandon_event(
                    ctxt, instance.uuid, RUN_EVENT, f"build skipped on {self.host}: {exc}"
                )
            return
        await self.notifier.emit(ctxt, instance, "instance.create.start")
        try:
            async with instance_event(
                ctxt, instance.uuid, RUN_EVENT, self.host, already_started=event_started
            ):
                await self._build(ctxt, instance, request_spec, block_device_mappings)
        except exception.UnexpectedTaskStateError as exc:
            # Someone else (a delete) took the instance over mid-build: leave it to them.
            bound.info("build_interrupted", reason=str(exc))
            await self._cleanup(instance)
            return
        except RESCHEDULABLE as exc:
            bound.warning("build_failed", error=str(exc), error_type=type(exc).__name__)
            await self._cleanup(instance)
            await self.notifier.emit(ctxt, instance, "instance.create.error", fault=str(exc))
            await self._reschedule(ctxt, instance, request_spec, str(exc))
            return
        except Exception as exc:
            bound.exception("build_failed_unexpectedly")
            await self._cleanup(instance)
            await self.notifier.emit(ctxt, instance, "instance.create.error", fault=str(exc))
            await self._set_error(ctxt, instance, f"{type(exc).__name__}: {exc}")
            return
        await InstanceAction.action_finish(ctxt, instance.uuid)
        await self.notifier.emit(ctxt, instance, "instance.create.end")
        bound.info("build_succeeded", host=self.host)

    async def _build(
        self,
        ctxt: RequestContext,
        instance: Instance,
        request_spec: dict[str, Any],
        bdms: BlockDeviceMappingList | None,
    ) -> None:
        await self.tracker.claim(instance)
        if bdms is None:
            bdms = await BlockDeviceMappingList.get_by_instance_uuid(ctxt, instance.uuid)
        # Read after taking the instance (its host is ours now), watched until the guest
        # exists: a rule change from here on is applied to it (compute_agent/security_groups).
        self.rules_watch.start(instance.uuid)
        try:
            rules = await SecurityGroupRuleList.get_by_instance(ctxt, instance.uuid)
            await self._spawn(ctxt, instance, request_spec, bdms, rules)
        finally:
            changed = self.rules_watch.finish(instance.uuid)
        if changed:
            rules = await SecurityGroupRuleList.get_by_instance(ctxt, instance.uuid)
            await self.driver.refresh_instance_security_rules(instance, rules_for_driver(rules))
        instance.vm_state = VMState.ACTIVE
        instance.task_state = None
        instance.power_state = PowerState.RUNNING
        instance.launched_at = utcnow()
        await instance.save(expected_task_state=[TaskState.SPAWNING])

    async def _spawn(
        self,
        ctxt: RequestContext,
        instance: Instance,
        request_spec: dict[str, Any],
        bdms: BlockDeviceMappingList,
        rules: SecurityGroupRuleList,
    ) -> None:
        block_device_info = [
            {"volume_id": b.volume_id, "mountpoint": b.device_name or f"/dev/vd{chr(98 + n)}"}
            for n, b in enumerate(bdms)
            if b.is_volume and b.volume_id
        ]
        instance.task_state = TaskState.SPAWNING
        await instance.save(expected_task_state=[TaskState.BLOCK_DEVICE_MAPPING])
        await self.driver.spawn(
            instance,
            str(request_spec.get("image_ref") or instance.image_ref or ""),
            block_device_info=block_device_info,
            security_rules=rules_for_driver(rules),
        )

    async def _cleanup(self, instance: Instance) -> None:
        """Undo a partial build on this host: no guest, no claim."""
        try:
            await self.driver.destroy(instance)
        except VirtError:
            log.exception("build_cleanup_destroy_failed", instance_uuid=instance.uuid)
        self.tracker.release(instance.uuid)

    async def _reschedule(
        self,
        ctxt: RequestContext,
        instance: Instance,
        request_spec: dict[str, Any],
        reason: str,
    ) -> None:
        # Hand the instance back, waiting to be scheduled again. It stays assigned to this
        # host: that is what proves to the conductor that the failed build was ours.
        instance.task_state = TaskState.SCHEDULING
        try:
            await instance.save(
                expected_task_state=[TaskState.BLOCK_DEVICE_MAPPING, TaskState.SPAWNING]
            )
            await self.tasks.reschedule_instance(
                ctxt,
                instance_uuid=instance.uuid,
                failed_host=self.host,
                reason=reason,
                request_spec=request_spec,
            )
        except exception.UnexpectedTaskStateError:
            log.info("reschedule_skipped_instance_moved_on", instance_uuid=instance.uuid)

    async def _set_error(self, ctxt: RequestContext, instance: Instance, message: str) -> None:
        instance.vm_state = VMState.ERROR
        instance.task_state = None
        await instance.save()
        await InstanceFault(
            ctxt, instance_uuid=instance.uuid, code=500, message=message[:255], host=self.host
        ).create()
        await InstanceAction.action_finish(ctxt, instance.uuid, message="Error")

    async def terminate_instance(self, ctxt: RequestContext, instance: Instance) -> None:
        # Never destroy on the word of the message alone: the instance must still be here,
        # being deleted and unlocked. The compare-and-swap on ``deleting`` makes that hold at
        # the moment we act (no other flow starts from ``deleting``).
        current = await Instance.get_by_uuid(ctxt, instance.uuid)
        if current.host != self.host or current.locked:
            log.warning(
                "terminate_refused",
                instance_uuid=instance.uuid,
                host=current.host,
                locked=current.locked,
            )
            return
        try:
            await current.save(expected_task_state=[TaskState.DELETING])
        except exception.UnexpectedTaskStateError as exc:
            log.warning("terminate_refused", instance_uuid=instance.uuid, reason=str(exc))
            return
        await self.notifier.emit(ctxt, instance, "instance.delete.start")
        async with instance_event(ctxt, instance.uuid, "compute_terminate_instance", self.host):
            await self.driver.destroy(instance)
            self.tracker.release(instance.uuid)
            for bdm in await BlockDeviceMappingList.get_by_instance_uuid(ctxt, instance.uuid):
                await bdm.destroy()
            instance.vm_state = VMState.DELETED
            instance.task_state = None
            instance.power_state = PowerState.SHUTDOWN
            instance.terminated_at = utcnow()
            await instance.save(expected_task_state=[TaskState.DELETING])
            await instance.destroy()
        await InstanceAction.action_finish(ctxt, instance.uuid)
        await self.notifier.emit(ctxt, instance, "instance.delete.end")
