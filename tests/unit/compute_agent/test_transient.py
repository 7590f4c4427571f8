"""Bounded retries of an agent flow's calls through an outage (compute_agent/transient.py)."""

from __future__ import annotations

from typing import Any

import pytest

from compute_agent.transient import Retrier, RetryPolicy
from shared_objects import exception
from shared_objects.runtime.messaging import MessageDeliveryFailure, MessagingTimeout


class FakeTime:
    """A clock that only moves when the retrier sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _retrier(total: float = 10.0) -> tuple[Retrier, FakeTime]:
    time = FakeTime()
    policy = RetryPolicy(total=total, initial=0.5, maximum=2.0)
    return Retrier(policy, clock=time.clock, sleep=time.sleep), time


def _failing(errors: list[BaseException], result: Any = "ok") -> Any:
    async def call() -> Any:
        if errors:
            raise errors.pop(0)
        return result

    return call


@pytest.mark.parametrize(
    "error",
    [
        exception.DatabaseUnavailable(reason="down"),
        MessagingTimeout("no reply"),
        MessageDeliveryFailure("broker gone"),
    ],
)
async def test_transient_errors_are_retried_with_backoff_until_the_call_succeeds(
    error: BaseException,
) -> None:
    retrier, time = _retrier()
    call = _failing([error, error, error, error])
    assert await retrier.call("save", call) == "ok"
    assert time.sleeps == [0.5, 1.0, 2.0, 2.0]
    assert retrier.retries == 4


async def test_past_the_bound_the_last_transient_error_is_raised() -> None:
    retrier, time = _retrier(total=3.0)
    errors = [exception.DatabaseUnavailable(reason=str(n)) for n in range(10)]
    with pytest.raises(exception.DatabaseUnavailable, match=r"\(2\)"):
        await retrier.call("save", _failing(errors))
    # 0.5 + 1.0 waited; a third wait (2.0) would pass the 3 s bound.
    assert time.sleeps == [0.5, 1.0]


async def test_other_errors_are_not_retried() -> None:
    retrier, time = _retrier()
    with pytest.raises(exception.InstanceNotFound):
        await retrier.call("read", _failing([exception.InstanceNotFound(instance_uuid="u")]))
    assert time.sleeps == []


async def test_done_if_is_asked_only_about_a_retry() -> None:
    retrier, _ = _retrier()
    asked: list[BaseException] = []

    async def gone(exc: BaseException) -> bool:
        asked.append(exc)
        return isinstance(exc, exception.NotFound)

    # First attempt: a NotFound is the truth, not a lost reply's echo.
    with pytest.raises(exception.InstanceNotFound):
        await retrier.write(
            "destroy", _failing([exception.InstanceNotFound(instance_uuid="u")]), done_if=gone
        )
    assert asked == []
    # A retry after a lost reply: the first attempt did it.
    lost = [MessagingTimeout("lost"), exception.InstanceNotFound(instance_uuid="u")]
    assert await retrier.write("destroy", _failing(lost), done_if=gone) is None
    assert len(asked) == 1


async def test_with_total_keeps_the_backoff_and_changes_the_bound() -> None:
    retrier, _ = _retrier(total=3.0)
    other = retrier.with_total(1000.0)
    assert other.policy == RetryPolicy(total=1000.0, initial=0.5, maximum=2.0)
    errors: list[BaseException] = [exception.DatabaseUnavailable(reason="x")] * 20
    assert await other.call("hand back", _failing(errors)) == "ok"
