"""Handing a build to its agent (``run_instance``; a host without a queue means placing it again)
and finishing builds and deletes nobody is responsible for any more, for the reconciler
(``conductor/reconcile/actions.py``): placed again, their delete resent, their cast repeated,
each a compare-and-swap on what the reconciler saw; the outcomes it counts.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from conductor.scheduler import HostState, ResourceRequest
from conductor.tasks.build_extras import RUN_EVENT, BuildExtras
from conductor.tasks.build_placement import BuildPlacement, _utcnow
from conductor.tasks.faults import set_instance_error
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.exception import NoValidHost
from shared_objects.fields import TaskState, VMState
from shared_objects.objects.instance import Instance
from shared_objects.objects.instance_action import InstanceAction
from shared_objects.runtime.messaging import MessageUndeliverable

log = structlog.get_logger(__name__)


#: What ``place_again`` and ``recast`` did.
RESCHEDULED = "rescheduled"
RECAST = "recast"
RESENT = "resent"
ERRORED = "error"
SKIPPED = "skipped"
NO_ACTION = "no_action"
#: The event recording that a conductor sent a build's ``run_instance`` again.
RECAST_EVENT = "conductor_recast_build"


class BuildRecovery(BuildPlacement):
    """Handing builds to agents (the cast), and finishing builds and deletes nobody is responsible
    for any more (the reconciler's moves)."""

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
