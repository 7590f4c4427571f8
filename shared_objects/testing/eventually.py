"""``eventually``: wait for a condition by polling it against a deadline, never by a fixed sleep.

A fixed ``sleep`` is either too short on a busy machine (a flaky failure) or long enough that the
test passes by another path than the one it is named for. Poll what proves the path ran (a
state, a counter, a log line) and fail with the last value seen.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T] | T],
    within: float = 10.0,
    *,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Call ``check`` (plain or async) until it returns something truthy, and return that.

    A check may also assert: an ``AssertionError`` counts as "not yet", and the last one is
    raised at the deadline, so ``eventually(lambda: assert_state(...))`` reports the mismatch.
    Raises ``AssertionError`` after ``within`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        failure: AssertionError | None = None
        value: T | None = None
        try:
            result = check()
            value = await result if inspect.isawaitable(result) else result
        except AssertionError as exc:
            failure = exc
        if failure is None and value:
            return value
        if loop.time() > deadline:
            if failure is not None:
                raise failure
            raise AssertionError(f"{what} not met within {within}s (last: {value!r})")
        await asyncio.sleep(interval)
