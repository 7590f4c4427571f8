"""Live migration on one host: the source, destination, control and recovery parts together.

``LiveMigrationManager`` is what the agent service builds and its RPC endpoint calls: each
method of the compute API's live-migration calls goes to the part that owns it
(``source.py``, ``destination.py``, ``control.py``, ``resolver.py``/``recovery.py``). The parts
share one settings object, one ``Retrier``, one resolver and one table of source-side jobs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from compute_agent.live_migration.control import Control
from compute_agent.live_migration.destination import Destination
from compute_agent.live_migration.jobs import Jobs
from compute_agent.live_migration.records import MigrationRecords
from compute_agent.live_migration.recovery import OrphanSweep, recover_migrations
from compute_agent.live_migration.resolver import BUSY, MigrationResolver
from compute_agent.live_migration.settings import LiveMigrationSettings
from compute_agent.live_migration.source import Source
from compute_agent.live_migration.wiring import Wiring
from compute_agent.resource_tracker import ResourceTracker
from compute_agent.transient import Retrier
from compute_agent.virt.driver import ComputeDriver
from shared_objects.context import RequestContext
from shared_objects.notifications import InstanceNotifier
from shared_objects.objects.instance import Instance
from shared_objects.objects.migration import Migration
from shared_objects.rpc_clients.compute import ComputeAPI


class LiveMigrationManager:
    """Source and destination halves of live migration on one host."""

    def __init__(
        self,
        host: str,
        driver: ComputeDriver,
        tracker: ResourceTracker,
        compute: ComputeAPI,
        notifier: InstanceNotifier,
        settings: LiveMigrationSettings | None = None,
        calls: Retrier | None = None,
    ) -> None:
        self.host = host
        self.driver = driver
        self.tracker = tracker
        self.compute = compute
        self.notifier = notifier
        # One object shared by every part: a change (tests tune it) reaches them all.
        self.settings = settings if settings is not None else LiveMigrationSettings()
        self.calls = calls if calls is not None else Retrier()
        self.resolver = MigrationResolver(
            host, driver, tracker, compute, self.settings, calls=self.calls
        )
        self.jobs = Jobs()
        records = MigrationRecords(host, self.calls)
        wiring = Wiring(
            host, driver, tracker, compute, notifier, self.settings, self.calls, self.resolver
        )
        self.source = Source(wiring, self.jobs, records)
        self.destination = Destination(wiring)
        self.control = Control(host, driver, self.settings, self.jobs)
        self.sweep = OrphanSweep(host, self.resolver, self.settings, self.jobs)

    # --- lifecycle ------------------------------------------------------------------------

    async def recover(self, ctxt: RequestContext, instances: list[Instance]) -> list[Instance]:
        """At start, before claims are computed: settle interrupted migrations on this host.

        Returns the instances this host must hold claims for afterwards.
        """
        return await recover_migrations(ctxt, self.resolver, instances)

    def start(self) -> None:
        """After the RPC server started: keep retrying what recovery could not settle yet,
        and look for migrations whose conductor vanished before handing them over."""
        self.resolver.start_retrying()
        self.sweep.start()

    async def stop(self) -> None:
        """Cancel what still runs after the RPC server's grace: the next start settles it."""
        await self.sweep.stop()
        await self.resolver.stop()
        tasks = self.jobs.tasks()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def sweep_wanted(self) -> Callable[[], bool]:
        """Whether the orphan sweep should read this host's migrations now (``OrphanSweep``)."""
        return self.sweep.wanted

    @sweep_wanted.setter
    def sweep_wanted(self, wanted: Callable[[], bool]) -> None:
        self.sweep.wanted = wanted

    @property
    def running(self) -> dict[str, str]:
        """``{migration uuid: stage}`` of source-side migrations in flight here."""
        return self.jobs.stages

    # --- destination ----------------------------------------------------------------------

    async def check_can_live_migrate_destination(
        self, ctxt: RequestContext, instance: Instance, migration: Migration, source_host: str
    ) -> dict[str, Any]:
        """Can this host take the instance? Asks the source in turn; returns the migrate data."""
        return await self.destination.check_can_live_migrate_destination(
            ctxt, instance, migration, source_host
        )

    async def pre_live_migration(
        self,
        ctxt: RequestContext,
        instance: Instance,
        migration: Migration,
        migrate_data: dict[str, Any],
    ) -> dict[str, Any]:
        """Claim here and create the paused incoming guest (volumes, firewall)."""
        return await self.destination.pre_live_migration(ctxt, instance, migration, migrate_data)

    async def post_live_migration_at_destination(
        self, ctxt: RequestContext, instance: Instance, migration: Migration
    ) -> dict[str, Any]:
        """Resume the guest here and move the instance to this host (see ``Destination``)."""
        return await self.destination.post_live_migration_at_destination(ctxt, instance, migration)

    async def rollback_live_migration_at_destination(
        self, ctxt: RequestContext, instance: Instance, migration: Migration
    ) -> None:
        """Remove the incoming guest, only while the instance is still the source's."""
        await self.destination.rollback_live_migration_at_destination(ctxt, instance, migration)

    async def hold_claim(self, instance: Instance) -> None:
        """Claim for a guest that is already here: over-commit is logged, never refused."""
        await self.destination.hold_claim(instance)

    # --- source ---------------------------------------------------------------------------

    async def check_can_live_migrate_source(
        self, ctxt: RequestContext, instance: Instance, dest_check_data: dict[str, Any]
    ) -> dict[str, Any]:
        """Can the guest leave this host? Returns the migrate data for the destination."""
        return await self.source.check_can_live_migrate_source(ctxt, instance, dest_check_data)

    async def live_migration(
        self,
        ctxt: RequestContext,
        instance: Instance,
        migration: Migration,
        migrate_data: dict[str, Any],
    ) -> dict[str, Any]:
        """Run the migration (once per Migration, even if the call is redelivered) to its end."""
        return await self.source.live_migration(ctxt, instance, migration, migrate_data)

    # --- control --------------------------------------------------------------------------

    async def live_migration_abort(
        self, ctxt: RequestContext, migration_uuid: str, reason: str | None = None
    ) -> None:
        """Stop the migration; the guest stays here. Too late once the switch-over began."""
        await self.control.live_migration_abort(ctxt, migration_uuid, reason)

    async def live_migration_force_complete(
        self, ctxt: RequestContext, migration_uuid: str
    ) -> None:
        """Pause the guest so the copy converges (only while copying)."""
        await self.control.live_migration_force_complete(ctxt, migration_uuid)

    # --- recovery -------------------------------------------------------------------------

    async def sweep_orphans(self, ctxt: RequestContext) -> int:
        """Settle migrations from this host stuck before the hand-over; returns how many."""
        return await self.sweep.sweep_orphans(ctxt)

    async def get_live_migration_guest(
        self, ctxt: RequestContext, instance_uuid: str
    ) -> str | None:
        """This hypervisor's phase of the guest (None when absent), or ``"busy"`` while a
        migration job of this host drives it (the peer's recovery then leaves it alone)."""
        if self.jobs.drives(instance_uuid):
            return BUSY
        phase = await self.resolver.local_phase(instance_uuid)
        return None if phase is None else phase.value

    async def settle_live_migration_peer(
        self, ctxt: RequestContext, instance: Instance, steps: list[str], owner: str | None
    ) -> None:
        """Recovery on the peer asks this host to run its share of a resolution."""
        await self.resolver.apply_local(instance, steps, owner)
