"""Source-side migrations in flight on this host: what abort, force-complete and the sweep see.

One ``Job`` per Migration this host drives as the source, from the conductor's ``live_migration``
call until the outcome is returned. The table is shared by the source flow (which adds and
advances jobs), the control calls (abort, force-complete) and recovery (the orphan sweep and
the peer's phase question leave a guest with a job alone).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from typing import Any

from shared_objects.fields import MigrationStatus

#: Statuses of a migration the conductor handed over (or is about to) that has not started here.
STARTABLE = (MigrationStatus.ACCEPTED, MigrationStatus.QUEUED)


class Stage(enum.StrEnum):
    """Where a source-side migration is, for abort and force-complete."""

    QUEUED = "queued"
    PREPARING = "preparing"
    COPYING = "copying"
    POST = "post"


@dataclasses.dataclass(slots=True)
class Job:
    instance_uuid: str
    stage: Stage = Stage.QUEUED
    abort_requested: bool = False
    abort_reason: str | None = None
    task: asyncio.Task[dict[str, Any]] | None = None


@dataclasses.dataclass(slots=True)
class Jobs:
    """The jobs of this host by migration uuid, and aborts that arrived before their job."""

    by_migration: dict[str, Job] = dataclasses.field(default_factory=dict)
    #: Migrations aborted while still queued at the conductor: refused when their call comes.
    early_aborts: set[str] = dataclasses.field(default_factory=set)

    def __len__(self) -> int:
        return len(self.by_migration)

    def __contains__(self, migration_uuid: object) -> bool:
        return migration_uuid in self.by_migration

    def get(self, migration_uuid: str) -> Job | None:
        return self.by_migration.get(migration_uuid)

    def add(self, migration_uuid: str, job: Job) -> None:
        """Track ``job`` (its task set) until its task ends."""
        assert job.task is not None
        self.by_migration[migration_uuid] = job
        job.task.add_done_callback(lambda _t: self.by_migration.pop(migration_uuid, None))

    def drives(self, instance_uuid: str) -> bool:
        """Whether a job of this host moves the guest right now."""
        return any(job.instance_uuid == instance_uuid for job in self.by_migration.values())

    @property
    def instance_uuids(self) -> set[str]:
        return {job.instance_uuid for job in self.by_migration.values()}

    @property
    def stages(self) -> dict[str, str]:
        """``{migration uuid: stage}``."""
        return {uuid: job.stage.value for uuid, job in self.by_migration.items()}

    def tasks(self) -> list[asyncio.Task[dict[str, Any]]]:
        """The jobs' tasks still running."""
        return [
            job.task
            for job in self.by_migration.values()
            if job.task is not None and not job.task.done()
        ]


def outcome(status: str, reason: str | None = None, host: str | None = None) -> dict[str, Any]:
    """What the source's ``live_migration`` call returns to the conductor."""
    return {"status": status, "reason": reason, "host": host}
