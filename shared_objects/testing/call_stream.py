"""Run many RPC calls at bounded concurrency and record how each one ended, and when.

Fault tests use it to prove "every call returns or fails clearly within its timeout, none hangs"::

    stream = CallStream(lambda i: client.call(ctxt, "echo", i=i), deadline=timeout + 1.0)
    outcomes = await stream.run(500, concurrency=32)
    assert not stream.hung

Each call is guarded by ``deadline``: a call still running then is cancelled and recorded as
*hung*, which is exactly the failure such tests look for (the runtime's own timeout should have
fired first).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["CallOutcome", "CallStream"]


@dataclasses.dataclass(slots=True)
class CallOutcome:
    """How one call ended: its result or exception, start time and duration (monotonic s)."""

    index: int
    started: float
    elapsed: float
    result: Any = None
    #: What the call raised (a leaked ``CancelledError`` included), None if it returned.
    error: BaseException | None = None
    hung: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.hung


class CallStream:
    """Issue ``count`` calls of ``make_call(i)`` with at most ``concurrency`` in flight."""

    def __init__(self, make_call: Callable[[int], Awaitable[Any]], *, deadline: float) -> None:
        """``deadline``: seconds after which a call that has not finished counts as hung."""
        self._make_call = make_call
        self.deadline = deadline
        self.outcomes: list[CallOutcome] = []
        self._done = asyncio.Condition()

    @property
    def hung(self) -> list[CallOutcome]:
        """Calls that neither returned nor raised within ``deadline``."""
        return [o for o in self.outcomes if o.hung]

    @property
    def succeeded(self) -> list[CallOutcome]:
        return [o for o in self.outcomes if o.ok]

    @property
    def failed(self) -> list[CallOutcome]:
        """Calls that raised (not counting hung ones)."""
        return [o for o in self.outcomes if o.error is not None]

    async def wait_finished(self, count: int, within: float) -> None:
        """Wait until at least ``count`` calls have finished (used to time a fault mid-stream)."""
        async with asyncio.timeout(within), self._done:
            await self._done.wait_for(lambda: len(self.outcomes) >= count)

    async def run(self, count: int, *, concurrency: int) -> list[CallOutcome]:
        """Run the calls; returns every outcome ordered by index."""
        indexes = iter(range(count))

        async def worker() -> None:
            for index in indexes:
                await self._one(index)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return sorted(self.outcomes, key=lambda o: o.index)

    async def _one(self, index: int) -> None:
        started = time.monotonic()
        outcome = CallOutcome(index=index, started=started, elapsed=0.0)
        task = asyncio.ensure_future(self._make_call(index))
        done, _ = await asyncio.wait({task}, timeout=self.deadline)
        if done:
            try:
                outcome.result = task.result()
            except Exception as exc:  # recorded for the test to judge, not swallowed
                outcome.error = exc
            except asyncio.CancelledError as exc:
                # Nobody cancelled the call (our own cancellation would surface at the wait
                # above): the call itself leaked a CancelledError, which tests must see.
                outcome.error = exc
        else:
            outcome.hung = True
            task.cancel()
            # Bounded: a call that even ignores cancellation must not hang the test.
            await asyncio.wait({task}, timeout=1.0)
        outcome.elapsed = time.monotonic() - started
        async with self._done:
            self.outcomes.append(outcome)
            self._done.notify_all()
