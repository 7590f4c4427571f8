"""Operator control of a running migration, on its source: abort and force-complete.

The conductor forwards ``live_migration_abort`` and ``live_migration_force_complete`` to the
source. An abort before the copy starts is recorded on the job (or, when the conductor's call
has not arrived yet, remembered for it) and ends the migration ``cancelled``; during the copy
the driver stops it; after the switch-over it is refused. Force-complete pauses the guest so
the copy converges, and only while copying.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from compute_agent.live_migration.jobs import STARTABLE, Job, Jobs, Stage
from compute_agent.live_migration.settings import LiveMigrationSettings
from compute_agent.virt.driver import ComputeDriver
from compute_agent.virt.exceptions import NoActiveMigration
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.objects.migration import Migration
from shared_objects.runtime.messaging import ExpectedException

log = structlog.get_logger(__name__)


class Control:
    """Abort and force-complete of this host's source-side migrations."""

    def __init__(
        self, host: str, driver: ComputeDriver, settings: LiveMigrationSettings, jobs: Jobs
    ) -> None:
        self.host = host
        self.driver = driver
        self.settings = settings
        self.jobs = jobs

    def _job_for(self, migration_uuid: str) -> Job:
        job = self.jobs.get(migration_uuid)
        if job is None:
            raise ExpectedException(
                exception.InvalidRequest(
                    reason=f"migration {migration_uuid} is not running on {self.host}"
                )
            )
        return job

    async def live_migration_abort(
        self, ctxt: RequestContext, migration_uuid: str, reason: str | None = None
    ) -> None:
        """Stop the migration; the guest stays here. Too late once the switch-over began.

        ``reason`` (compute RPC 1.1) ends up in the fault that records the cancellation."""
        if migration_uuid not in self.jobs:
            migration = await Migration.get_by_uuid(ctxt, migration_uuid)
            if (
                migration_uuid not in self.jobs  # still, after the await
                and migration.source_compute == self.host
                and migration.status in STARTABLE
            ):
                # Queued by the conductor, its call not taken up here yet: remember it.
                self.jobs.early_aborts.add(migration_uuid)
                log.info("live_migration_abort_before_start", migration_uuid=migration_uuid)
                return
        job = self._job_for(migration_uuid)
        if job.stage is Stage.POST:
            raise ExpectedException(
                exception.InvalidRequest(
                    reason=f"migration {migration_uuid} is past the switch-over; cannot abort"
                )
            )
        job.abort_requested = True
        job.abort_reason = reason
        if job.stage is Stage.COPYING:
            await self._control(job, migration_uuid, self.driver.live_migration_abort)
        log.info("live_migration_abort_requested", migration_uuid=migration_uuid)

    async def live_migration_force_complete(
        self, ctxt: RequestContext, migration_uuid: str
    ) -> None:
        """Pause the guest so the copy converges (only while copying)."""
        job = self._job_for(migration_uuid)
        if job.stage is not Stage.COPYING:
            raise ExpectedException(
                exception.InvalidRequest(
                    reason=f"migration {migration_uuid} is not copying memory ({job.stage.value})"
                )
            )
        await self._control(job, migration_uuid, self.driver.live_migration_force_complete)
        log.info("live_migration_force_complete_requested", migration_uuid=migration_uuid)

    async def _control(
        self, job: Job, migration_uuid: str, action: Callable[[str], Awaitable[None]]
    ) -> None:
        # The copy may be registering in the driver right now: retry briefly before refusing.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.control_grace
        while True:
            try:
                await action(job.instance_uuid)
                return
            except NoActiveMigration as exc:
                if job.stage is not Stage.COPYING or loop.time() > deadline:
                    raise ExpectedException(
                        exception.InvalidRequest(
                            reason=f"migration {migration_uuid} has no copy in progress"
                        )
                    ) from exc
            await asyncio.sleep(0.02)
