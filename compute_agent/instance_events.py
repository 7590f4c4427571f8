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
from shared_objects.objects.instance_action_event import InstanceActionEvent

log = structlog.get_logger(__name__)


@contextlib.asynccontextmanager
async def instance_event(
    ctxt: RequestContext, instance_uuid: str, event: str, host: str | None
) -> AsyncIterator[None]:
    started = True
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
                result="Error",
                traceback="".join(traceback.format_exception(exc))[-4000:],
                details=str(exc)[:255],
            )
        raise
    if started:
        await InstanceActionEvent.event_finish(ctxt, instance_uuid, event)
