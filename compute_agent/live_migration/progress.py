"""Saving a copy's progress reports: at a bounded rate, never failing the copy."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from compute_agent.live_migration.settings import LiveMigrationSettings
from compute_agent.transient import TRANSIENT_ERRORS, short
from compute_agent.virt.models import MigrationProgress
from shared_objects.fields import TaskState
from shared_objects.objects.instance import Instance
from shared_objects.objects.migration import Migration

log = structlog.get_logger(__name__)


def progress_saver(
    instance: Instance, migration: Migration, settings: LiveMigrationSettings
) -> Callable[[MigrationProgress], Awaitable[None]]:
    """The driver's progress callback for one copy: saves the Migration's totals and the
    instance's percentage, at most every ``settings.progress_interval`` seconds (the final
    report always)."""
    loop = asyncio.get_running_loop()
    last = [float("-inf")]

    async def save(progress: MigrationProgress) -> None:
        now = loop.time()
        final = progress.percent >= 100
        if not final and now - last[0] < settings.progress_interval:
            return
        last[0] = now
        migration.memory_total = progress.memory_total
        migration.memory_processed = progress.memory_processed
        migration.memory_remaining = progress.memory_remaining
        if not migration.obj_attr_is_set("disk_total") or migration.disk_total is None:
            # Migration 1.1: the local disk travels too. The fake hypervisor moves it
            # with the incoming guest in pre_live_migration, so it is complete by now.
            disk = instance.root_gb * 1024**3
            migration.disk_total = disk
            migration.disk_processed = disk
            migration.disk_remaining = 0
        try:
            await migration.save()
            if instance.progress != progress.percent:
                instance.progress = progress.percent
                await instance.save(expected_task_state=[TaskState.MIGRATING])
        except TRANSIENT_ERRORS as exc:
            # Progress is a report, not a state: an outage must not fail a healthy copy.
            # The next report carries the totals again (fields still marked changed).
            log.warning("live_migration_progress_not_saved", error=short(exc))

    return save
