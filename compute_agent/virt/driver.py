"""``ComputeDriver``: the interface between the compute agent and a hypervisor.

Every method is a coroutine; a real driver does its blocking work in threads or with async
clients. Instances are passed as objects (``InstanceLike``, or just ``HasUUID`` where only the
identity matters). The contract each method documents — especially what state the guest is in
after an exception — is what the agent's flows rely on; docs/virt.md describes the whole picture.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from compute_agent.virt.exceptions import InstanceNotFound, NotSupported
from compute_agent.virt.firewall import FirewallRule
from compute_agent.virt.models import (
    GuestPhase,
    HasUUID,
    HostResources,
    InstanceInfo,
    InstanceLike,
    MigrationProgress,
    MigrationResult,
)

#: Receives live-migration progress; awaited by the driver at a bounded rate.
ProgressCallback = Callable[[MigrationProgress], Awaitable[None]]

#: Volumes to connect at spawn: ``[{"volume_id": ..., "mountpoint": "/dev/vdb"}, ...]``.
BlockDeviceInfo = Sequence[Mapping[str, str]]


class ComputeDriver(abc.ABC):
    """A hypervisor as the compute agent sees it (one driver instance per agent/host)."""

    # --- host -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def init_host(self, host: str) -> None:
        """Attach to the hypervisor of ``host`` and load what survived an agent restart.

        Guests whose operation the restart interrupted are reported by ``list_guests`` with
        ``interrupted`` set; nothing is deleted here — deciding is the agent's recovery.
        """

    async def cleanup_host(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """Stop in-flight driver work (e.g. migration copies) at agent shutdown."""

    @abc.abstractmethod
    async def get_available_resource(self) -> HostResources:
        """Capacity and usage as the hypervisor sees them (every guest present counts)."""

    # --- inventory ------------------------------------------------------------------------

    @abc.abstractmethod
    async def list_instance_uuids(self) -> list[str]:
        """UUIDs of every guest defined on this hypervisor, whatever its phase."""

    @abc.abstractmethod
    async def list_guests(self) -> list[InstanceInfo]:
        """``get_info`` of every guest (what recovery after a restart starts from)."""

    @abc.abstractmethod
    async def instance_exists(self, uuid: str) -> bool:
        """True if a guest with this UUID is defined here (any phase)."""

    @abc.abstractmethod
    async def get_info(self, uuid: str) -> InstanceInfo:
        """Power state, phase and attachments of one guest; InstanceNotFound if absent."""

    async def get_phase(self, uuid: str) -> GuestPhase | None:
        """The guest's phase, or None if absent: the input of ``recovery.resolve_migration``."""
        try:
            return (await self.get_info(uuid)).phase
        except InstanceNotFound:
            return None

    # --- lifecycle ------------------------------------------------------------------------

    @abc.abstractmethod
    async def spawn(
        self,
        instance: InstanceLike,
        image_ref: str,
        block_device_info: BlockDeviceInfo | None = None,
        security_rules: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Create and boot a guest with its volumes connected and firewall rules applied.

        Raises InstanceExists, InsufficientResources or a VirtError; after any exception no
        guest is left behind (a partial build is cleaned up by the driver).
        """

    @abc.abstractmethod
    async def destroy(self, instance: HasUUID) -> None:
        """Remove the guest, its volumes' connections and its firewall. Idempotent.

        A copy in progress for this guest is stopped (its live_migration raises MigrationAborted).
        """

    async def power_off(self, instance: HasUUID) -> None:
        """Shut the guest down (it stays defined). Optional."""
        raise NotSupported(operation="power_off")

    async def power_on(self, instance: HasUUID) -> None:
        """Boot a powered-off guest. Optional."""
        raise NotSupported(operation="power_on")

    # --- volumes --------------------------------------------------------------------------

    @abc.abstractmethod
    async def attach_volume(self, instance: HasUUID, volume_id: str, mountpoint: str) -> None:
        """Connect a volume to a running or stopped guest; VolumeAlreadyAttached if in use."""

    @abc.abstractmethod
    async def detach_volume(self, instance: HasUUID, volume_id: str) -> None:
        """Disconnect a volume; VolumeNotAttached if it is not attached to this guest."""

    @abc.abstractmethod
    async def get_volumes(self, uuid: str) -> dict[str, str]:
        """``{volume_id: mountpoint}`` of the guest; InstanceNotFound if absent."""

    # --- firewall -------------------------------------------------------------------------

    @abc.abstractmethod
    async def refresh_instance_security_rules(
        self, instance: HasUUID, rules: Sequence[Mapping[str, Any]]
    ) -> None:
        """Replace the guest's firewall with ``rules`` (see ``firewall.normalize_rule``).

        InvalidFirewallRule leaves the previous rules in place.
        """

    @abc.abstractmethod
    async def get_firewall_rules(self, uuid: str) -> list[FirewallRule]:
        """The applied rules in canonical form (``firewall.normalize_rules``)."""

    @abc.abstractmethod
    async def unfilter_instance(self, instance: HasUUID) -> None:
        """Remove every firewall rule of the guest. Idempotent."""

    # --- live migration -------------------------------------------------------------------

    @abc.abstractmethod
    async def check_can_live_migrate_destination(
        self, instance: InstanceLike, source_host: str | None = None
    ) -> dict[str, Any]:
        """On the destination: can this host take the guest? Returns dest check data.

        Raises MigrationPreCheckError (e.g. the guest is already here) or InsufficientResources.
        """

    @abc.abstractmethod
    async def check_can_live_migrate_source(
        self, instance: InstanceLike, dest_check_data: Mapping[str, Any]
    ) -> dict[str, Any]:
        """On the source: can the guest leave? Returns the migrate data for pre_live_migration
        (the dest check data plus the guest's volumes and firewall rules)."""

    @abc.abstractmethod
    async def pre_live_migration(
        self, instance: InstanceLike, migrate_data: Mapping[str, Any]
    ) -> dict[str, Any]:
        """On the destination: create the paused INCOMING guest with volumes and firewall.

        Idempotent for the same source. Raises InsufficientResources, InstanceExists.
        """

    @abc.abstractmethod
    async def live_migration(
        self,
        instance: InstanceLike,
        dest: str,
        migrate_data: Mapping[str, Any],
        progress_cb: ProgressCallback | None = None,
    ) -> MigrationResult:
        """On the source: copy memory until the switch-over, then return.

        On return the source guest is MIGRATED_OUT (paused, persisted): the guest now belongs
        to the destination. If it raises (MigrationAborted, MigrationNotConverging, any
        VirtError) the guest is RUNNING on the source, untouched.
        """

    @abc.abstractmethod
    async def live_migration_abort(self, uuid: str) -> None:
        """Stop the copy; live_migration then raises MigrationAborted. NoActiveMigration if no
        copy is in progress or the switch-over already started."""

    @abc.abstractmethod
    async def live_migration_force_complete(self, uuid: str) -> None:
        """Pause the guest so the copy converges. NoActiveMigration if no copy is running."""

    @abc.abstractmethod
    async def post_live_migration(self, instance: HasUUID) -> None:
        """On the source after the switch-over: remove the MIGRATED_OUT copy. Idempotent.

        Call only once the destination's guest is RUNNING (post_live_migration_at_destination).
        InvalidGuestState if the guest here is not MIGRATED_OUT (it would be the live copy).
        """

    @abc.abstractmethod
    async def post_live_migration_at_destination(self, instance: HasUUID) -> None:
        """On the destination: resume the INCOMING guest (now RUNNING). Idempotent."""

    @abc.abstractmethod
    async def rollback_live_migration_at_destination(self, instance: HasUUID) -> None:
        """On the destination: remove the INCOMING guest and its volume connections.

        Idempotent if absent; InvalidGuestState if the guest here is RUNNING (the live copy).
        """

    @abc.abstractmethod
    async def rollback_live_migration_at_source(self, instance: HasUUID) -> None:
        """On the source: resume a MIGRATED_OUT guest whose destination was rolled back.

        A no-op if the guest is already running here. Call only after the destination's
        rollback (see ``recovery.resolve_migration``).
        """
