"""Riding out a database or broker outage in the agent's flows: bounded retries of their calls.

A build, a delete, a volume change or a live migration in progress must survive PostgreSQL or
RabbitMQ going away for a few seconds: every object call they make (a read, a compare-and-swap
save, an event) then fails with one of ``TRANSIENT_ERRORS``. ``Retrier.call`` tries again with
exponential backoff until the call succeeds or ``RetryPolicy.total`` seconds have passed, logging
one short WARNING line per retry; past the bound it raises the last error and the flow settles
to its defined outcome (the build is cleaned up and handed back, see ``compute_agent/build.py``).

A lost reply (``MessagingTimeout``) leaves the caller unsure whether the write happened, so a
retried write must be idempotent. Compare-and-swap saves are: a save whose first attempt landed
finds the task state already moved on, and ``Retrier.save`` checks that it moved to exactly what
this save wrote (``_landed``) before calling the conflict real.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

import structlog

from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.objects.instance import Instance
from shared_objects.runtime.messaging import MessageDeliveryFailure, MessagingTimeout

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

#: Errors that say "not now" about a call to the conductor: the database is down (the
#: conductor said so), the call got no reply in time, or the broker did not take the message.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    exception.DatabaseUnavailable,
    MessagingTimeout,
    MessageDeliveryFailure,
)

# Fields a compare-and-swap save of a flow writes, compared after a conflict on a retry.
_STATE_FIELDS = ("task_state", "vm_state", "host", "node", "power_state")


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long a flow keeps retrying one call: ``total`` seconds in all (``inf``: until it
    succeeds or the agent stops), waiting ``initial`` seconds first and doubling up to
    ``maximum`` between attempts."""

    total: float = 120.0
    initial: float = 0.5
    maximum: float = 8.0

    def delays(self) -> Iterator[float]:
        delay = self.initial
        while True:
            yield delay
            delay = min(delay * 2, self.maximum)


def short(exc: BaseException) -> str:
    """One line naming the error (remote tracebacks and driver detail left out)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:160] if text else type(exc).__name__


class Retrier:
    """Retries a flow's calls through a transient outage, within its ``RetryPolicy``."""

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.policy = policy if policy is not None else RetryPolicy()
        self._clock = clock
        self._sleep = sleep
        #: Retries made so far (all calls), for tests and stats.
        self.retries = 0

    def with_total(self, total: float) -> Retrier:
        """The same retrier with another bound (e.g. ``math.inf`` for a hand-back that must
        land eventually, or a short one on a shutdown path)."""
        return Retrier(
            dataclasses.replace(self.policy, total=total), clock=self._clock, sleep=self._sleep
        )

    async def call(self, what: str, fn: Callable[[], Awaitable[_T]], **fields: Any) -> _T:
        """``await fn()`` until it succeeds; transient errors are retried within the bound,
        then the last one is raised. ``fields`` go into the log lines."""
        return await self._attempts(what, fn, None, fields)

    async def write(
        self,
        what: str,
        fn: Callable[[], Awaitable[_T]],
        *,
        done_if: Callable[[BaseException], Awaitable[bool]],
        **fields: Any,
    ) -> _T | None:
        """Like ``call`` for a write that is not idempotent by itself: ``done_if`` is asked
        about an error raised by a *retry* (never the first attempt); True means an earlier
        attempt whose reply was lost already did the work, and None is returned."""
        return await self._attempts(what, fn, done_if, fields)

    async def _attempts(
        self,
        what: str,
        fn: Callable[[], Awaitable[_T]],
        done_if: Callable[[BaseException], Awaitable[bool]] | None,
        fields: dict[str, Any],
    ) -> Any:
        started = self._clock()
        delays = self.policy.delays()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await fn()
            except TRANSIENT_ERRORS as exc:
                delay = next(delays)
                spent = self._clock() - started
                if spent + delay > self.policy.total:
                    log.warning(
                        "transient_retry_gave_up",
                        call=what,
                        attempts=attempt,
                        seconds=round(spent, 1),
                        error=short(exc),
                        **fields,
                    )
                    raise
                self.retries += 1
                log.warning(
                    "transient_retry",
                    call=what,
                    attempt=attempt,
                    delay=round(delay, 2),
                    error=short(exc),
                    **fields,
                )
                await self._sleep(delay)
            except Exception as exc:
                if attempt > 1 and done_if is not None and await done_if(exc):
                    log.info("transient_retry_found_done", call=what, attempt=attempt, **fields)
                    return None
                raise

    async def save(
        self,
        ctxt: RequestContext,
        what: str,
        instance: Instance,
        expected: Iterable[str | None] | None = None,
    ) -> None:
        """``instance.save(expected_task_state=expected)`` through an outage; a retry that
        finds the row already holding what this save wrote counts as done."""
        wanted = {
            name: getattr(instance, name)
            for name in _STATE_FIELDS
            if name in instance.obj_what_changed()
        }
        expected_list = list(expected) if expected is not None else None

        async def landed(exc: BaseException) -> bool:
            if not isinstance(exc, exception.UnexpectedTaskStateError) or not wanted:
                return False
            return await _landed(ctxt, instance.uuid, wanted)

        async def once() -> None:
            if expected_list is None:
                await instance.save()
            else:
                await instance.save(expected_task_state=expected_list)

        await self.write(what, once, done_if=landed, instance_uuid=instance.uuid)


async def is_not_found(exc: BaseException) -> bool:
    """``done_if`` for a destroy: a retry finding the row gone means the lost attempt did it."""
    return isinstance(exc, exception.NotFound)


async def _landed(ctxt: RequestContext, instance_uuid: str, wanted: dict[str, Any]) -> bool:
    """Whether the row holds every value of ``wanted`` (an earlier attempt's write landed)."""
    current = await Instance.get_by_uuid(ctxt, instance_uuid)
    return all(getattr(current, name) == value for name, value in wanted.items())


UNBOUNDED = math.inf
