"""InstanceActionEvents as an ``async with`` block instead of a decorator tower.

    async with instance_event(ctxt, instance.uuid, "compute_run_instance", host):
        ...  # event recorded as started; finished Success, or Error with the exception

The event belongs to the action of the context's request, so a build that is rescheduled shows
every attempt under its one ``create`` action.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import AsyncIterator

import structlog

from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.objects.instance_action_event import RESULT_ERROR, InstanceActionEvent

log = structlog.get_logger(__name__)


@contextlib.asynccontextmanager
async def instance_event(
    ctxt: RequestContext,
    instance_uuid: str,
    event: str,
    host: str | None,
    *,
    already_started: bool = False,
) -> AsyncIterator[None]:
    """``already_started``: the sender recorded the start in the unit of work that dispatched
    this work (the conductor, for run_instance at compute RPC >= 1.2), so only the finish is
    left to record here: one object call instead of two."""
    started = True
    if not already_started:
        try:
            await InstanceActionEvent.event_start(ctxt, instance_uuid, event, host)
        except exception.InstanceActionNotFound:
            # Work started without an action (e.g. recovery): proceed, just unrecorded.
            started = False
            log.debug("no_action_for_event", instance_uuid=instance_uuid, event_name=event)
    try:
        yield
    except BaseException as exc:
        if started:
            await InstanceActionEvent.event_finish(
                ctxt,
                instance_uuid,
                event,
                result=RESULT_ERROR,
                traceback="".join(traceback.format_exception(exc))[-4000:],
                details=str(exc)[:255],
            )
        raise
    if started:
        await InstanceActionEvent.event_finish(ctxt, instance_uuid, event)


async def abandon_event(ctxt: RequestContext, instance_uuid: str, event: str, why: str) -> None:
    """Close an event someone else started for work this host will not do, so the action does
    not show an attempt that looks in progress forever. Best effort: the action may be gone."""
    try:
        await InstanceActionEvent.event_finish(
            ctxt, instance_uuid, event, result=RESULT_ERROR, details=why[:255]
        )
    except exception.InstanceActionNotFound:
        log.debug("abandoned_event_not_found", instance_uuid=instance_uuid, event_name=event)
