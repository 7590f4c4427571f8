"""The destination half of live migration: the checks, the paused incoming guest, the switch-over.

The source drives every step (``source.py``); this host answers its calls:

* ``check_can_live_migrate_destination`` (from the conductor): can this host take the guest?
  It asks the source in turn and returns the migrate data;
* ``pre_live_migration``: claim here and create the paused ``incoming`` guest;
* ``post_live_migration_at_destination``: resume the guest and move the instance here (a
  compare-and-swap on ``task_state == migrating``);
* ``rollback_live_migration_at_destination``: remove the incoming guest, only while the
  instance is still the source's.
"""

from __future__ import annotations

from typing import Any

import structlog

from compute_agent.instance_events import instance_event
from compute_agent.live_migration.records import notification_extra
from compute_agent.live_migration.wiring import Half
from compute_agent.virt.exceptions import MigrationPreCheckError, VirtError
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.exception import InsufficientResources as ClaimRefused
from shared_objects.fields import TaskState
from shared_objects.objects.instance import Instance
from shared_objects.objects.migration import Migration
from shared_objects.runtime.messaging import ExpectedException

log = structlog.get_logger(__name__)


class Destination(Half):
    """This host as the destination of live migrations."""

    # --- checks ---------------------------------------------------------------------------

    async def check_can_live_migrate_destination(
        self, ctxt: RequestContext, instance: Instance, migration: Migration, source_host: str
    ) -> dict[str, Any]:
        """Can this host take the instance? Asks the source in turn; returns the migrate data."""
        log.info(
            "live_migration_check_destination",
            instance_uuid=instance.uuid,
            migration_uuid=migration.uuid,
            source=source_host,
        )
        async with instance_event(
            ctxt, instance.uuid, "compute_check_can_live_migrate_destination", self.host
        ):
            dest_data = await self.driver.check_can_live_migrate_destination(instance, source_host)
            self._check_claim_fits(instance)
            dest_data["dest_node"] = self.tracker.nodename
            settings = self.settings
            return await self.compute.check_can_live_migrate_source(
                ctxt,
                source_host,
                instance=instance,
                dest_check_data=dest_data,
                call_monitor_timeout=settings.call_monitor_timeout,
                timeout=settings.rpc_timeout,
            )

    def _check_claim_fits(self, instance: Instance) -> None:
        """The tracker's view, without holding anything (the claim comes in pre_live_migration)."""
        claims = self.tracker.claims
        if claims.holds(instance.uuid):
            raise MigrationPreCheckError(
                uuid=instance.uuid, reason=f"already claimed on {self.host}"
            )
        used = claims.usage
        max_vcpus, max_ram, max_disk = claims.capacity.limits
        if (
            used.vcpus + instance.vcpus > max_vcpus
            or used.memory_mb + instance.memory_mb > max_ram
            or used.disk_gb + instance.root_gb > max_disk
        ):
            raise MigrationPreCheckError(
                uuid=instance.uuid, reason=f"not enough free capacity on {self.host}"
            )

    # --- the guest arrives ----------------------------------------------------------------
    async def pre_live_migration(
        self,
        ctxt: RequestContext,
        instance: Instance,
        migration: Migration,
        migrate_data: dict[str, Any],
    ) -> dict[str, Any]:
        """Claim here and create the paused incoming guest (volumes, firewall)."""
        log.info(
            "live_migration_pre_destination",
            instance_uuid=instance.uuid,
            migration_uuid=migration.uuid,
        )
        async with instance_event(
            ctxt, instance.uuid, "compute_pre_live_migration", self.host, calls=self.calls
        ):
            await self.tracker.claim(instance)
            try:
                return await self.driver.pre_live_migration(instance, migrate_data)
            except Exception:
                self.tracker.release(instance.uuid)
                raise

    async def post_live_migration_at_destination(
        self, ctxt: RequestContext, instance: Instance, migration: Migration
    ) -> dict[str, Any]:
        """Resume the guest here and move the instance to this host (a CAS on ``migrating``).

        Returns ``{"ok": True}``, or ``{"ok": False, "rolled_back": True, "reason": ...}`` when
        the guest could not be resumed and was removed from here (the source may resume it).
        Raises when the outcome is unknown; the source then settles from both phases.
        """
        current = await self.calls.call(
            "read instance", lambda: Instance.get_by_uuid(ctxt, instance.uuid)
        )
        if current.host == self.host and current.task_state is None:
            return {"ok": True}  # a redelivery, or recovery got here first
        try:
            async with instance_event(
                ctxt,
                instance.uuid,
                "compute_post_live_migration_at_destination",
                self.host,
                calls=self.calls,
            ):
                await self.driver.post_live_migration_at_destination(instance)
        except VirtError as exc:
            log.warning("post_at_destination_failed", instance_uuid=instance.uuid, error=str(exc))
            # Backward order: remove the incoming guest before the source resumes its copy.
            await self.driver.rollback_live_migration_at_destination(instance)
            self.tracker.release(instance.uuid)
            return {"ok": False, "rolled_back": True, "reason": f"{type(exc).__name__}: {exc}"}
        await self.hold_claim(instance)
        await self.resolver.move_instance_here(ctxt, current, migration)
        await self.notifier.emit(
            ctxt,
            current,
            "instance.live_migration_post_dest.end",
            extra=notification_extra(migration),
        )
        return {"ok": True}

    async def rollback_live_migration_at_destination(
        self, ctxt: RequestContext, instance: Instance, migration: Migration
    ) -> None:
        """Remove the incoming guest (idempotent) and release the claim.

        Only while the instance is still the source's and migrating: once it has moved here the
        guest on this host is the only running copy, and a (late, repeated or forged) rollback
        must not destroy it. The compare-and-swap on ``migrating`` checks that at the moment
        we act."""
        calls = self.calls
        migration = await calls.call(
            "read migration", lambda: Migration.get_by_uuid(ctxt, migration.uuid)
        )
        current = await calls.call(
            "read instance", lambda: Instance.get_by_uuid(ctxt, instance.uuid)
        )
        if current.host == self.host or current.host != migration.source_compute:
            log.warning(
                "rollback_at_destination_refused",
                instance_uuid=instance.uuid,
                host=current.host,
                source=migration.source_compute,
            )
            raise ExpectedException(
                exception.InvalidRequest(
                    reason=f"instance {instance.uuid} is on {current.host}: nothing to roll back"
                )
            )
        # Changes nothing: a retry after a lost reply asks the same question again.
        await calls.save(ctxt, "check migrating", current, [TaskState.MIGRATING])
        async with instance_event(
            ctxt,
            instance.uuid,
            "compute_rollback_live_migration_at_destination",
            self.host,
            calls=calls,
        ):
            await self.driver.rollback_live_migration_at_destination(instance)
            self.tracker.release(instance.uuid)

    async def hold_claim(self, instance: Instance) -> None:
        """Claim for a guest that is already here: over-commit is logged, never refused."""
        try:
            await self.tracker.claim(instance)
        except ClaimRefused:
            log.error("claim_over_capacity_for_present_guest", instance_uuid=instance.uuid)
