"""run_instance and terminate_instance on the agent: the build flow after scheduling.

Every state change is a compare-and-swap save with the task state the step expects
(scheduling → block_device_mapping → spawning → None), so a redelivered or duplicated request
finds the instance already moved on and does nothing. A failed build releases its claim, removes
any partial guest and hands the instance back to the conductor to be rescheduled; the conductor
decides between another host and ERROR.

Database and broker outages (``compute_agent/transient.py``): every call of the flow is retried
with backoff for up to ``RetryPolicy.total`` seconds, so a build in progress survives an outage
of a few seconds and still ends ACTIVE. Past that bound the outcome is defined: the guest is
destroyed and the claim released (no guest runs that the database does not show ACTIVE), and the
build is handed back by a background task that retries until the hand-back lands or the agent
stops. A build never taken (the first save failed) is left in ``scheduling`` on this host, which
the conductor's reconciler re-casts; after a restart ``init_host`` settles whatever is left.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Coroutine
from typing import Any

import structlog

from compute_agent.instance_events import abandon_event, instance_event
from compute_agent.resource_tracker import ResourceTracker
from compute_agent.security_groups import RulesWatch, rules_for_driver
from compute_agent.transient import TRANSIENT_ERRORS, UNBOUNDED, Retrier, is_not_found, short
from compute_agent.virt.driver import ComputeDriver
from compute_agent.virt.exceptions import VirtError
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.fields import PowerState, TaskState, VMState
from shared_objects.notifications import InstanceNotifier
from shared_objects.objects.block_device_mapping import BlockDeviceMappingList
from shared_objects.objects.instance import Instance
from shared_objects.objects.instance_action import InstanceAction
from shared_objects.objects.instance_action_event import RESULT_ERROR, InstanceActionEvent
from shared_objects.objects.instance_fault import InstanceFault
from shared_objects.objects.security_group_rule import SecurityGroupRuleList
from shared_objects.rpc_clients.compute_task import ComputeTaskAPI
from shared_objects.runtime.messaging import MessagingError

log = structlog.get_logger(__name__)

# Failures that mean "this host could not build it": another host may succeed.
RESCHEDULABLE = (exception.InsufficientResources, VirtError)

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
        calls: Retrier | None = None,
    ) -> None:
        self.host = host
        # Every conductor call of a flow goes through here (bounded retries of outages).
        self.calls = calls if calls is not None else Retrier()
        # Hand-backs of builds abandoned during an outage, retried until they land.
        self._background: set[asyncio.Task[None]] = set()
        # Builds this agent is working on. A duplicate run_instance (a re-cast by the
        # conductor's reconciler while the first is still retrying its take through an outage)
        # must stop here: both would write the same values, so the take's "did my lost write
        # land?" check could not tell them apart.
        self._building: set[str] = set()
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
        if instance.uuid in self._building:
            bound.info("build_skipped_in_progress")
            return
        self._building.add(instance.uuid)
        try:
            await self._run_instance(
                ctxt, instance, request_spec, block_device_mappings, event_started, bound
            )
        finally:
            self._building.discard(instance.uuid)

    async def _run_instance(
        self,
        ctxt: RequestContext,
        instance: Instance,
        request_spec: dict[str, Any],
        block_device_mappings: BlockDeviceMappingList | None,
        event_started: bool,
        bound: Any,
    ) -> None:
        # Take the build: the conductor assigned it to this host (only then may this agent
        # write the row at all), and only a build still waiting to be scheduled can be taken.
        # A duplicate or re-cast run_instance finds it taken already and stops here.
        instance.node = self.tracker.nodename
        instance.task_state = TaskState.BLOCK_DEVICE_MAPPING
        try:
            await self.calls.save(ctxt, "take build", instance, [TaskState.SCHEDULING])
        except exception.Forbidden as exc:
            # A stale cast (from before a restart) of a build the conductor has since moved
            # to another host: the row is not ours to take, and its events are not ours either.
            bound.info("build_skipped_not_assigned_here", reason=str(exc))
            return
        except exception.UnexpectedTaskStateError as exc:
            bound.info("build_skipped_not_scheduling", reason=str(exc))
            if event_started:
                await abandon_event(
                    ctxt, instance.uuid, RUN_EVENT, f"build skipped on {self.host}: {exc}"
                )
            return
        except TRANSIENT_ERRORS as exc:
            # Nothing was done here: the build waits in scheduling, assigned to this host, for
            # the conductor's reconciler to cast it again.
            bound.error(
                "build_not_taken",
                error=short(exc),
                detail="left in scheduling on this host; the conductor casts it again",
            )
            return
        await self._notify(ctxt, instance, "instance.create.start")
        built = False
        try:
            async with instance_event(
                ctxt,
                instance.uuid,
                RUN_EVENT,
                self.host,
                already_started=event_started,
                calls=self.calls,
            ):
                await self._build(ctxt, instance, request_spec, block_device_mappings)
                built = True
        except Exception as exc:
            if not built:
                await self._build_failed(ctxt, instance, request_spec, exc, bound)
                return
            # The instance is ACTIVE with its guest running: only the event's finish could
            # not be recorded. Undoing the build for that would leave ACTIVE with no guest.
            bound.warning("build_event_not_recorded", error=short(exc))
        await self._finish_action(ctxt, instance.uuid)
        await self._notify(ctxt, instance, "instance.create.end")
        bound.info("build_succeeded", host=self.host)

    async def _build_failed(
        self,
        ctxt: RequestContext,
        instance: Instance,
        request_spec: dict[str, Any],
        exc: Exception,
        bound: Any,
    ) -> None:
        """The defined outcome of each way a build fails before it is ACTIVE."""
        if isinstance(exc, exception.UnexpectedTaskStateError):
            # Someone else (a delete) took the instance over mid-build: leave it to them.
            bound.info("build_interrupted", reason=str(exc))
            await self._cleanup(instance)
        elif isinstance(exc, RESCHEDULABLE):
            bound.warning("build_failed", error=str(exc), error_type=type(exc).__name__)
            await self._cleanup(instance)
            await self._notify(ctxt, instance, "instance.create.error", fault=str(exc))
            await self._reschedule(ctxt, instance, request_spec, str(exc), self.calls)
        elif isinstance(exc, TRANSIENT_ERRORS):
            reason = (
                f"the build on {self.host} could not be recorded for "
                f"{self.calls.policy.total:.0f} s ({short(exc)})"
            )
            bound.error("build_abandoned_outage", error=short(exc), detail="guest removed")
            await self._cleanup(instance)
            self._in_background(
                f"hand-back-{instance.uuid}",
                self._hand_back(ctxt, instance, request_spec, reason),
            )
        else:
            bound.exception("build_failed_unexpectedly", exc_info=exc)
            await self._cleanup(instance)
            await self._notify(ctxt, instance, "instance.create.error", fault=str(exc))
            await self._set_error(ctxt, instance, f"{type(exc).__name__}: {exc}")

    async def _build(
        self,
        ctxt: RequestContext,
        instance: Instance,
        request_spec: dict[str, Any],
        bdms: BlockDeviceMappingList | None,
    ) -> None:
        await self.tracker.claim(instance)
        mappings: BlockDeviceMappingList = (
            bdms
            if bdms is not None
            else await self.calls.call(
                "read BDMs",
                lambda: BlockDeviceMappingList.get_by_instance_uuid(ctxt, instance.uuid),
            )
        )
        # Read after taking the instance (its host is ours now), watched until the guest
        # exists: a rule change from here on is applied to it (compute_agent/security_groups).
        self.rules_watch.start(instance.uuid)
        try:
            rules = await self.calls.call(
                "read rules", lambda: SecurityGroupRuleList.get_by_instance(ctxt, instance.uuid)
            )
            await self._spawn(ctxt, instance, request_spec, mappings, rules)
        finally:
            changed = self.rules_watch.finish(instance.uuid)
        if changed:
            rules = await self.calls.call(
                "read rules", lambda: SecurityGroupRuleList.get_by_instance(ctxt, instance.uuid)
            )
            await self.driver.refresh_instance_security_rules(instance, rules_for_driver(rules))
        instance.vm_state = VMState.ACTIVE
        instance.task_state = None
        instance.power_state = PowerState.RUNNING
        instance.launched_at = utcnow()
        await self.calls.save(ctxt, "build done", instance, [TaskState.SPAWNING])

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
        await self.calls.save(ctxt, "spawning", instance, [TaskState.BLOCK_DEVICE_MAPPING])
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
        calls: Retrier,
    ) -> None:
        # Hand the instance back, waiting to be scheduled again. It stays assigned to this
        # host: that is what proves to the conductor that the failed build was ours.
        instance.task_state = TaskState.SCHEDULING
        try:
            await calls.save(
                ctxt,
                "hand back build",
                instance,
                [TaskState.BLOCK_DEVICE_MAPPING, TaskState.SPAWNING],
            )
            await calls.write(
                "reschedule",
                lambda: self.tasks.reschedule_instance(
                    ctxt,
                    instance_uuid=instance.uuid,
                    failed_host=self.host,
                    reason=reason,
                    request_spec=request_spec,
                ),
                # A retry refused because the build is no longer waiting for us: the first
                # call, whose reply was lost, rescheduled it.
                done_if=_is_invalid_request,
                instance_uuid=instance.uuid,
            )
        except exception.UnexpectedTaskStateError:
            log.info("reschedule_skipped_instance_moved_on", instance_uuid=instance.uuid)
        except TRANSIENT_ERRORS as exc:
            # If the hand-back save landed, the build waits in scheduling on this host and the
            # conductor's reconciler casts it again; if not, it stays in a build state with no
            # guest here until the hand-back or init_host (at the next start) settles it.
            log.error(
                "reschedule_not_requested",
                instance_uuid=instance.uuid,
                error=short(exc),
                task_state=instance.task_state,
            )

    async def _hand_back(
        self,
        ctxt: RequestContext,
        instance: Instance,
        request_spec: dict[str, Any],
        reason: str,
    ) -> None:
        """After an outage outlasted the retry bound: record the failed attempt and hand the
        build back, retrying until it lands (or the agent stops; init_host settles it then)."""
        calls = self.calls.with_total(UNBOUNDED)
        try:
            await calls.call(
                "run event error",
                lambda: InstanceActionEvent.event_finish(
                    ctxt, instance.uuid, RUN_EVENT, result=RESULT_ERROR, details=reason[:255]
                ),
                instance_uuid=instance.uuid,
            )
        except exception.InstanceActionNotFound:
            pass  # built without an action: nothing to record
        await self._notify(ctxt, instance, "instance.create.error", fault=reason)
        await self._reschedule(ctxt, instance, request_spec, reason, calls)
        log.info("build_handed_back_after_outage", instance_uuid=instance.uuid)

    async def _set_error(self, ctxt: RequestContext, instance: Instance, message: str) -> None:
        instance.vm_state = VMState.ERROR
        instance.task_state = None
        try:
            await self.calls.save(ctxt, "set error", instance)
            await self.calls.call(
                "record fault",
                InstanceFault(
                    ctxt,
                    instance_uuid=instance.uuid,
                    code=500,
                    message=message[:255],
                    host=self.host,
                ).create,
                instance_uuid=instance.uuid,
            )
        except TRANSIENT_ERRORS as exc:
            log.error(
                "build_error_not_recorded",
                instance_uuid=instance.uuid,
                error=short(exc),
                detail="no guest here; init_host puts it in ERROR at the next start",
            )
            return
        await self._finish_action(ctxt, instance.uuid, message="Error")

    async def _finish_action(
        self, ctxt: RequestContext, instance_uuid: str, message: str | None = None
    ) -> None:
        """Close the request's action; past the bound it stays open (logged): the state of the
        instance is already right, only its history lacks the finish time."""
        try:
            await self.calls.call(
                "finish action",
                lambda: InstanceAction.action_finish(ctxt, instance_uuid, message=message),
                instance_uuid=instance_uuid,
            )
        except TRANSIENT_ERRORS as exc:
            log.warning("action_finish_not_recorded", instance_uuid=instance_uuid, error=short(exc))

    async def _notify(
        self, ctxt: RequestContext, instance: Instance, event_type: str, fault: str | None = None
    ) -> None:
        """Notifications are best effort: a broker outage must not fail the flow."""
        try:
            await self.notifier.emit(ctxt, instance, event_type, fault=fault)
        except MessagingError as exc:
            log.warning("notification_not_sent", event_type=event_type, error=short(exc))

    def _in_background(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("build_background_failed", task=task.get_name(), exc_info=task.exception())

    async def stop(self) -> None:
        """Cancel hand-backs still waiting for the outage to end (init_host settles them)."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if tasks:
            log.warning("build_hand_backs_cancelled", count=len(tasks))

    async def terminate_instance(self, ctxt: RequestContext, instance: Instance) -> None:
        # Never destroy on the word of the message alone: the instance must still be here,
        # being deleted and unlocked. The compare-and-swap on ``deleting`` makes that hold at
        # the moment we act (no other flow starts from ``deleting``). Every call is retried
        # through an outage; each step is idempotent (a retried destroy of what is gone is
        # done), so a delete interrupted past the bound is finished by the next request or
        # by init_host.
        calls = self.calls
        try:
            current = await calls.call(
                "read instance",
                lambda: Instance.get_by_uuid(ctxt, instance.uuid),
                instance_uuid=instance.uuid,
            )
        except TRANSIENT_ERRORS as exc:
            log.error("terminate_not_started", instance_uuid=instance.uuid, error=short(exc))
            return
        if current.host != self.host or current.locked:
            log.warning(
                "terminate_refused",
                instance_uuid=instance.uuid,
                host=current.host,
                locked=current.locked,
            )
            return
        try:
            await calls.save(ctxt, "check deleting", current, [TaskState.DELETING])
        except exception.UnexpectedTaskStateError as exc:
            log.warning("terminate_refused", instance_uuid=instance.uuid, reason=str(exc))
            return
        except TRANSIENT_ERRORS as exc:
            log.error("terminate_not_started", instance_uuid=instance.uuid, error=short(exc))
            return
        await self._notify(ctxt, instance, "instance.delete.start")
        try:
            async with instance_event(
                ctxt, instance.uuid, "compute_terminate_instance", self.host, calls=calls
            ):
                await self.driver.destroy(instance)
                self.tracker.release(instance.uuid)
                bdms = await calls.call(
                    "read BDMs",
                    lambda: BlockDeviceMappingList.get_by_instance_uuid(ctxt, instance.uuid),
                    instance_uuid=instance.uuid,
                )
                for bdm in bdms:
                    await calls.write(
                        "destroy BDM", bdm.destroy, done_if=is_not_found, bdm_id=bdm.id
                    )
                instance.vm_state = VMState.DELETED
                instance.task_state = None
                instance.power_state = PowerState.SHUTDOWN
                instance.terminated_at = utcnow()
                await calls.save(ctxt, "deleted", instance, [TaskState.DELETING])
                await calls.write(
                    "destroy instance",
                    instance.destroy,
                    done_if=is_not_found,
                    instance_uuid=instance.uuid,
                )
        except TRANSIENT_ERRORS as exc:
            # The guest is gone; the row still says deleting on this host. Deleting it again
            # (fleetctl delete) or init_host at the next start finishes the job.
            log.error(
                "terminate_not_recorded",
                instance_uuid=instance.uuid,
                error=short(exc),
                detail="guest destroyed; instance left in deleting",
            )
            return
        await self._finish_action(ctxt, instance.uuid)
        await self._notify(ctxt, instance, "instance.delete.end")


async def _is_invalid_request(exc: BaseException) -> bool:
    return isinstance(exc, exception.InvalidRequest)
