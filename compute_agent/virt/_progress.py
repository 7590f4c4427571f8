"""Rate-bounded, non-blocking delivery of live-migration progress to the agent's callback."""

from __future__ import annotations

import asyncio
import time

import structlog

from compute_agent.virt.driver import ProgressCallback
from compute_agent.virt.migration_model import CopyState
from compute_agent.virt.models import MigrationProgress

LOG = structlog.get_logger(__name__)


class ProgressReporter:
    """Sends progress to the agent's callback without ever stalling the copy.

    At most one callback runs at a time, in its own task, and at most one per
    ``interval_s``; a report due while one is still running is skipped (the next round will
    carry fresher numbers). The first and the final report always go out, in order.
    """

    def __init__(self, callback: ProgressCallback | None, interval_s: float, uuid: str) -> None:
        self._callback = callback
        self._interval = interval_s
        self._uuid = uuid
        self._task: asyncio.Task[None] | None = None
        self._last: float | None = None
        self._percent = 0
        self._final: MigrationProgress | None = None

    def report(self, state: CopyState, forced: bool, final: bool = False) -> None:
        if self._callback is None:
            return
        self._percent = 100 if final else max(self._percent, state.percent())
        progress = MigrationProgress(
            memory_total=state.memory_total,
            memory_processed=state.memory_processed,
            memory_remaining=state.memory_remaining,
            rounds=state.rounds,
            percent=self._percent,
            forced=forced,
        )
        if final:
            self._final = progress
            return
        now = time.monotonic()
        if self._last is not None and now - self._last < self._interval:
            return
        if self._task is not None and not self._task.done():
            return
        self._last = now
        self._task = asyncio.get_running_loop().create_task(self._send(progress))

    async def close(self) -> None:
        """Wait for the report in flight, then send the final one (if the copy finished)."""
        if self._task is not None:
            await self._task
        if self._final is not None:
            await self._send(self._final)

    async def _send(self, progress: MigrationProgress) -> None:
        assert self._callback is not None
        try:
            await self._callback(progress)
        except Exception as exc:  # progress is advisory: a failed report must not stop the copy
            LOG.warning("fake_migration_progress_failed", uuid=self._uuid, error=repr(exc))
