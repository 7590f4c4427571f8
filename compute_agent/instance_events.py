"""InstanceActionEvents as an ``async with`` block instead of a decorator tower.

    async with instance_event(ctxt, instance.uuid, "compute_run_instance", host):
        ...  # event recorded as started; finished Success, or Error with the exception

The event belongs to the action of the context's request, so a build that is rescheduled shows
every attempt under its one ``create`` action. With a ``Retrier`` (``compute_agent/transient.py``)
the event calls ride out a database or broker outage. When the block itself failed on such an
outage (past its retry bound) the error is not recorded here: the database is known to be
unreachable, and the flow records it once the outage is over (the build's hand-back,
``compute_agent/build.py``).
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import AsyncIterator

import structlog

from compute_agent.transient import TRANSIENT_ERRORS, Retrier, RetryPolicy, short
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
    calls: Retrier | None = None,
) -> AsyncIterator[None]:
    """``already_started``: the sender recorded the start in the unit of work that dispatched
    this work (the conductor, for run_instance at compute RPC >= 1.2), so only the finish is
    left to record here: one object call instead of two. ``calls``: retry the event calls
    through an outage (default: one attempt each)."""
    retrier = calls if calls is not None else Retrier(RetryPolicy(total=0.0))
    started = True
    if not already_started:
        try:
            await retrier.call(
                f"{event} start",
                lambda: InstanceActionEvent.event_start(ctxt, instance_uuid, event, host),
                instance_uuid=instance_uuid,
            )
        except exception.InstanceActionNotFound:
            # Work started without an action (e.g. recovery): proceed, just unrecorded.
            started = False
            log.debug("no_action_for_event", instance_uuid=instance_uuid, event_name=event)
    try:
        yield
    except BaseException as exc:
        # A flow that retries its calls and still failed on an outage knows the database is
        # unreachable: it records the error itself once the outage is over.
        outage = calls is not None and isinstance(exc, TRANSIENT_ERRORS)
        if started and not outage:
            trace = "".join(traceback.format_exception(exc))[-4000:]
            details = str(exc)[:255]
            try:
                await retrier.call(
                    f"{event} finish",
                    lambda: InstanceActionEvent.event_finish(
                        ctxt,
                        instance_uuid,
                        event,
                        result=RESULT_ERROR,
                        traceback=trace,
                        details=details,
                    ),
                    instance_uuid=instance_uuid,
                )
            except TRANSIENT_ERRORS as lost:
                # The flow's own error matters more than its record: keep raising that one.
                log.warning(
                    "event_finish_not_recorded",
                    instance_uuid=instance_uuid,
                    event_name=event,
                    error=short(lost),
                )
        raise
    if started:
        await retrier.call(
            f"{event} finish",
            lambda: InstanceActionEvent.event_finish(ctxt, instance_uuid, event),
            instance_uuid=instance_uuid,
        )


async def abandon_event(
    ctxt: RequestContext,
    instance_uuid: str,
    event: str,
    why: str,
    calls: Retrier | None = None,
) -> None:
    """Close an event someone else started for work this host will not do, so the action does
    not show an attempt that looks in progress forever. Best effort: the action may be gone,
    and an outage past the retry bound only leaves the event open (logged)."""
    retrier = calls if calls is not None else Retrier(RetryPolicy(total=0.0))
    try:
        await retrier.call(
            f"{event} abandon",
            lambda: InstanceActionEvent.event_finish(
                ctxt, instance_uuid, event, result=RESULT_ERROR, details=why[:255]
            ),
            instance_uuid=instance_uuid,
        )
    except exception.InstanceActionNotFound:
        log.debug("abandoned_event_not_found", instance_uuid=instance_uuid, event_name=event)
    except TRANSIENT_ERRORS as exc:
        log.warning(
            "abandoned_event_not_recorded",
            instance_uuid=instance_uuid,
            event_name=event,
            error=short(exc),
        )
