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
import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from conductor.db.session import Database
from conductor.host_view import FleetView, HostView, HostViewSettings
from conductor.scheduler import HostState, ResourceRequest, select_destinations
from conductor.tasks.build_extras import RUN_EVENT, BuildExtras, bdm_list, start_run_event
from conductor.tasks.faults import set_instance_error
from conductor.tasks.hosts import PlacementLedger
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.exception import NoValidHost
from shared_objects.fields import BDMDestinationType, BDMSourceType, TaskState, VMState
from shared_objects.messaging import MessageUndeliverable
from shared_objects.objects.block_device_mapping import BlockDeviceMapping, BlockDeviceMappingList
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.instance import Instance
from shared_objects.objects.instance_action import InstanceAction
from shared_objects.objects.instance_action_event import InstanceActionEvent
from shared_objects.objects.security_group import SecurityGroup, SecurityGroupList
from shared_objects.rpc_clients.compute import ComputeAPI

log = structlog.get_logger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class _Record:
    """What the request's unit of work created for one instance."""

    instance: Instance
    bdms: BlockDeviceMappingList
    action_id: int


MAX_COUNT = 1000

#: What ``place_again`` and ``recast`` did.
RESCHEDULED = "rescheduled"
RECAST = "recast"
RESENT = "resent"
ERRORED = "error"
SKIPPED = "skipped"
NO_ACTION = "no_action"
#: The event recording that a conductor sent a build's ``run_instance`` again.
RECAST_EVENT = "conductor_recast_build"


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclasses.dataclass(slots=True)
class BuildSettings:
    max_attempts: int = 3
    alternates: int = 2
    service_down_time: float = 60.0


def _invalid(reason: str) -> exception.InvalidRequest:
    return exception.InvalidRequest(reason=reason)


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


class BuildTask:
    """Conductor side of booting instances."""

    def __init__(
        self,
        database: Database,
        compute: ComputeAPI,
        settings: BuildSettings | None = None,
        host_view: HostView | None = None,
    ) -> None:
        self.database = database
        self.compute = compute
        self.settings = settings or BuildSettings()
        self.ledger = PlacementLedger()
        # This conductor's cached view of the hosts, shared with live migration.
        self.host_view = host_view or HostView(
            HostViewSettings(service_down_time=self.settings.service_down_time)
        )

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

    async def _extras_for_request(
        self,
        ctxt: RequestContext,
        records: list[_Record],
        picks: list[list[HostState]],
    ) -> list[BuildExtras | None]:
        """For each instance whose host speaks compute RPC 1.2: its BDMs and its started event;
        None for the others (they get the 1.0 message)."""
        extras: list[BuildExtras | None] = []
        for record, pick in zip(records, picks, strict=True):
            host = pick[0].host
            if not self.compute.can_send_build_extras(host):
                extras.append(None)
                continue
            # The action was created in this unit of work: start the event under it directly.
            await InstanceActionEvent.start_under(ctxt, record.action_id, RUN_EVENT, host)
            extras.append(BuildExtras(block_device_mappings=record.bdms, event_started=True))
        return extras

    async def _schedule(
        self,
        ctxt: RequestContext,
        req: ResourceRequest,
        count: int,
        *,
        force_host: str | None = None,
        ignore_hosts: list[str] | None = None,
    ) -> list[list[HostState]]:
        """Pick hosts from the cached view; a refusal (no valid host, unknown forced host) is
        checked again on a view refreshed now, since the cache may lag by a refresh interval
        (a host that just came up, capacity just freed)."""
        view = await self.host_view.fleet(ctxt)
        if force_host is None or any(h.host == force_host for h in view.states):
            try:
                return self._place(
                    view, req, count, force_host=force_host, ignore_hosts=ignore_hosts
                )
            except NoValidHost:
                pass
        view = await self.host_view.fleet(ctxt, fresh=True)
        if force_host is not None and not any(h.host == force_host for h in view.states):
            raise _invalid(f"forced host {force_host!r} is not a known compute host")
        return self._place(view, req, count, force_host=force_host, ignore_hosts=ignore_hosts)

    def _place(
        self,
        view: FleetView,
        req: ResourceRequest,
        count: int,
        *,
        force_host: str | None = None,
        ignore_hosts: list[str] | None = None,
    ) -> list[list[HostState]]:
        # No await from here to the end: concurrent requests see each other's placements.
        states = self.ledger.apply(view.states, view.reported_at, view.positions)
        picks = select_destinations(
            states,
            req,
            count,
            alternates=self.settings.alternates,
            force_host=force_host,
            ignore_hosts=ignore_hosts or (),
            floors=view.floors,
        )
        for pick in picks:
            self.ledger.record(pick[0].host, req)
        return picks

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

    async def _cast_build(
        self,
        ctxt: RequestContext,
        instance: Instance,
        hosts: list[str],
        *,
        attempt: int,
        tried: list[str],
        extras: BuildExtras | None,
    ) -> None:
        host, alternates = hosts[0], hosts[1:]
        request_spec = {
            "image_ref": instance.image_ref,
            "attempt": attempt,
            "tried_hosts": [*tried, host],
            "max_attempts": self.settings.max_attempts,
        }
        log.info("build_scheduled", instance_uuid=instance.uuid, host=host, attempt=attempt)
        try:
            await self.compute.run_instance(
                ctxt,
                host,
                instance=instance,
                request_spec=request_spec,
                alternates=alternates,
                attempt=attempt,
                block_device_mappings=extras.block_device_mappings if extras else None,
                event_started=extras.event_started if extras else False,
            )
        except MessageUndeliverable as exc:
            # No queue for that host (its agent is gone): nobody will ever take the build
            # there. Place it elsewhere now; the compare-and-swap expects it still waiting
            # on this host, so a build someone else moved meanwhile is left alone.
            log.warning(
                "build_cast_undeliverable", instance_uuid=instance.uuid, host=host, error=str(exc)
            )
            await self.place_again(
                ctxt,
                instance_uuid=instance.uuid,
                expected={"task_state": TaskState.SCHEDULING, "host": host},
                failed_host=host,
                reason=f"run_instance could not be delivered to {host}",
                tried=tried,
                attempt=attempt,
            )

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

    async def _extras_for_reschedule(
        self, ctxt: RequestContext, instance: Instance, host: str
    ) -> BuildExtras:
        # A reschedule is a request of its own: nothing of the first attempt's unit of work is
        # at hand, so read what the agent would have read (at most four queries, no RPC).
        return BuildExtras(
            block_device_mappings=await BlockDeviceMappingList.get_by_instance_uuid(
                ctxt, instance.uuid
            ),
            event_started=await start_run_event(ctxt, instance.uuid, host),
        )

    # --- builds handed over by the reconciler (conductor.reconcile) or an undeliverable cast --

    async def place_again(
        self,
        ctxt: RequestContext,
        *,
        instance_uuid: str,
        expected: Mapping[str, Any],
        failed_host: str | None,
        reason: str,
        tried: Sequence[str] = (),
        attempt: int = 1,
    ) -> str:
        """Place a stranded build on another host, or put it in ERROR with a fault when no
        attempt or no host is left; ``attempt`` is the number of attempts made so far.

        Every change is one compare-and-swap on the instance's ``expected`` columns (task
        state, host, and ``updated_at`` as the caller read them), so of two conductors acting
        on the same build only one does. ``ctxt`` carries the request id of the build's
        ``create`` action (the attempts are recorded under it). Returns ``RESCHEDULED``,
        ``ERRORED`` or ``SKIPPED`` (the build moved on meanwhile).
        """
        avoid = list(dict.fromkeys([*tried, *([failed_host] if failed_host else [])]))
        async with self.database.request(ctxt):
            instance = await Instance.get_by_uuid(ctxt, instance_uuid)
            if not _matches(instance, expected):
                return SKIPPED
            failure: tuple[str, int] | None = None
            picks: list[list[HostState]] = []
            where = f" on {failed_host}" if failed_host else ""
            if attempt >= self.settings.max_attempts:
                failure = (
                    f"Exceeded maximum number of build attempts ({self.settings.max_attempts}). "
                    f"Last failure{where}: {reason}",
                    500,
                )
            else:
                req = ResourceRequest(instance.vcpus, instance.memory_mb, instance.root_gb)
                try:
                    picks = await self._schedule(ctxt, req, 1, ignore_hosts=avoid)
                except NoValidHost as exc:
                    failure = (f"{exc} Build failed{where}: {reason}", 503)
            if failure is not None:
                unassigned = {"vm_state": VMState.ERROR, "task_state": None, "host": None}
                if not await _swap(ctxt, instance, expected, {**unassigned, "node": None}):
                    return SKIPPED
                await set_instance_error(
                    ctxt, instance, failure[0], code=failure[1], host=failed_host
                )
                await _close_attempt(ctxt, instance_uuid, failed_host, reason)
                return ERRORED
            host = picks[0][0].host
            moved = {"task_state": TaskState.SCHEDULING, "host": host, "node": None}
            if not await _swap(ctxt, instance, expected, moved):
                return SKIPPED
            await _close_attempt(ctxt, instance_uuid, failed_host, reason)
            extras = None
            if self.compute.can_send_build_extras(host):
                extras = await self._extras_for_reschedule(ctxt, instance, host)
        await self._cast_build(
            ctxt,
            instance,
            [h.host for h in picks[0]],
            attempt=attempt + 1,
            tried=avoid,
            extras=extras,
        )
        return RESCHEDULED

    async def resend_delete(
        self, ctxt: RequestContext, *, instance_uuid: str, expected: Mapping[str, Any]
    ) -> str:
        """Send ``terminate_instance`` again to the up host of a delete that has not finished
        (the reconciler's ``delete_not_finished``: the first cast was lost, or the agent gave
        up during an outage). Harmless if the first is still running: the agent destroys only
        after a compare-and-swap on ``deleting``, and a destroy of what is gone is done.

        One compare-and-swap on ``expected`` stamps the instance first, so one conductor sends
        it and the rule's bound starts again. Returns ``RESENT`` or ``SKIPPED``. It lives here,
        beside ``recast``, because the reconciler drives its re-sends through this task.
        """
        async with self.database.request(ctxt):
            instance = await Instance.get_by_uuid(ctxt, instance_uuid)
            if not _matches(instance, expected) or instance.host is None:
                return SKIPPED
            if not await _swap(ctxt, instance, expected, {}):
                return SKIPPED
        await self.compute.terminate_instance(ctxt, instance.host, instance=instance)
        return RESENT

    async def recast(
        self,
        ctxt: RequestContext,
        *,
        instance_uuid: str,
        expected: Mapping[str, Any],
        reason: str,
        tried: Sequence[str] = (),
        attempt: int = 1,
    ) -> str:
        """Send a build's ``run_instance`` again to the host it is assigned to (its first cast
        was lost). Harmless if it was not: the agent's take is a compare-and-swap on
        ``scheduling``, so a duplicate is skipped.

        One compare-and-swap on ``expected`` stamps the instance and records a
        ``conductor_recast_build`` event at that same time under its ``create`` action: that
        event is what tells a later pass the build was re-cast already. Returns ``RECAST``,
        ``SKIPPED``, or ``NO_ACTION`` (no ``create`` action to record it under: place the build
        elsewhere instead).
        """
        async with self.database.request(ctxt):
            instance = await Instance.get_by_uuid(ctxt, instance_uuid)
            if not _matches(instance, expected) or instance.host is None:
                return SKIPPED
            try:
                action = await InstanceAction.get_by_request_id(
                    ctxt, instance_uuid, ctxt.request_id
                )
            except exception.InstanceActionNotFound:
                return NO_ACTION
            now = _utcnow()
            if not await _swap(ctxt, instance, expected, {}, now=now):
                return SKIPPED
            db = ctxt.db
            assert db is not None
            await db.insert(
                "instance_action_events",
                {
                    "action_id": action.id,
                    "event": RECAST_EVENT,
                    "start_time": now,
                    "finish_time": now,
                    "result": "Success",
                    "host": instance.host,
                    "details": reason[:4000],
                    "created_at": now,
                    "deleted": False,
                },
            )
            extras = None
            if self.compute.can_send_build_extras(instance.host):
                extras = await self._extras_for_reschedule(ctxt, instance, instance.host)
        await self._cast_build(
            ctxt,
            instance,
            [instance.host],
            attempt=attempt,
            tried=[h for h in tried if h != instance.host],
            extras=extras,
        )
        return RECAST


def _matches(instance: Instance, expected: Mapping[str, Any]) -> bool:
    """The instance still looks as expected (the compare-and-swap decides; this only saves
    the placement work when it obviously moved on)."""
    return all(
        getattr(instance, name) == value
        for name, value in expected.items()
        if name in ("task_state", "host", "vm_state")
    )


async def _swap(
    ctxt: RequestContext,
    instance: Instance,
    expected: Mapping[str, Any],
    values: Mapping[str, Any],
    *,
    now: datetime.datetime | None = None,
) -> bool:
    """One ``UPDATE instances ... WHERE uuid AND <expected>``; False when the row moved on.
    ``instance`` follows on success."""
    db = ctxt.db
    assert db is not None
    stamp = now if now is not None else _utcnow()
    rows = await db.update(
        "instances",
        {"uuid": instance.uuid, "deleted": False, **expected},
        {**values, "updated_at": stamp},
        returning=["updated_at"],
    )
    if not rows:
        log.info("build_moved_on", instance_uuid=instance.uuid, expected=dict(expected))
        return False
    for name, value in values.items():
        setattr(instance, name, value)
    instance.updated_at = rows[0]["updated_at"]
    instance.obj_reset_changes()
    return True


async def _close_attempt(
    ctxt: RequestContext, instance_uuid: str, host: str | None, reason: str
) -> None:
    """Record the failed attempt on ``host`` as an ``Error`` event of the build's action: its
    open event finished (its agent never took the build, or died with it), or, when nobody
    started one (the cast carried no event start), a finished one. The attempts a build has
    had are counted from these events."""
    if host is None:
        return
    try:
        action = await InstanceAction.get_by_request_id(ctxt, instance_uuid, ctxt.request_id)
    except exception.InstanceActionNotFound:
        return
    db = ctxt.db
    assert db is not None
    now = _utcnow()
    where = {"action_id": action.id, "event": RUN_EVENT, "host": host}
    ended = {"finish_time": now, "updated_at": now, "result": "Error", "details": reason[:255]}
    if await db.update("instance_action_events", {**where, "finish_time": None}, ended):
        return
    if await db.select("instance_action_events", where, columns=["id"], limit=1):
        return
    await db.insert(
        "instance_action_events",
        {**where, **ended, "start_time": now, "created_at": now, "deleted": False},
    )
