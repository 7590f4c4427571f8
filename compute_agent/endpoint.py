"""The agent's RPC endpoint: the compute API, dispatched to the manager that owns each call.

Who may call what is in ``shared_objects.policy.COMPUTE_RPC_POLICY`` (checked by the RPC
server's authorizer before anything is decoded); the live-migration peer methods also check here
that an agent caller is the other side of the migration (``compute_agent.peer_auth``).
"""

from __future__ import annotations

from typing import Any

from compute_agent.build import BuildManager
from compute_agent.live_migration import LiveMigrationManager
from compute_agent.peer_auth import PeerCheck
from compute_agent.security_groups import SecurityGroupManager
from compute_agent.volumes import VolumeManager
from shared_objects.context import RequestContext
from shared_objects.objects.block_device_mapping import (
    BlockDeviceMapping,
    BlockDeviceMappingList,
)
from shared_objects.objects.instance import Instance
from shared_objects.objects.live_migrate_data import LiveMigrateData
from shared_objects.objects.migration import Migration
from shared_objects.rpc_clients.compute import API_VERSION
from shared_objects.runtime.messaging import Target, expose


class ComputeEndpoint:
    target = Target(version=API_VERSION)

    def __init__(
        self,
        build: BuildManager,
        volumes: VolumeManager,
        security: SecurityGroupManager,
        live_migration: LiveMigrationManager | None = None,
        peers: PeerCheck | None = None,
    ) -> None:
        self.peers = peers if peers is not None else PeerCheck(build.host)
        self.build = build
        self.volumes = volumes
        self.security = security
        self._live_migration = live_migration

    @expose
    async def run_instance(
        self,
        ctxt: RequestContext,
        instance: Instance,
        request_spec: dict[str, Any],
        alternates: list[str],
        attempt: int,
        block_device_mappings: BlockDeviceMappingList | None = None,
        event_started: bool = False,
    ) -> None:
        # The extras arrive from conductors casting at 1.2; older ones send none of them.
        await self.build.run_instance(
            ctxt,
            instance,
            request_spec,
            alternates,
            attempt,
            block_device_mappings=block_device_mappings,
            event_started=event_started,
        )

    @expose
    async def terminate_instance(self, ctxt: RequestContext, instance: Instance) -> None:
        await self.build.terminate_instance(ctxt, instance)

    @expose
    async def attach_volume(
        self, ctxt: RequestContext, instance: Instance, bdm: BlockDeviceMapping
    ) -> None:
        await self.volumes.attach_volume(ctxt, instance, bdm)

    @expose
    async def detach_volume(self, ctxt: RequestContext, instance: Instance, volume_id: str) -> None:
        await self.volumes.detach_volume(ctxt, instance, volume_id)

    @expose
    async def refresh_instance_security_rules(
        self, ctxt: RequestContext, instance: Instance
    ) -> None:
        await self.security.refresh_instance_security_rules(ctxt, instance)

    # --- live migration (compute_agent/live_migration/) ----------------------------------

    @property
    def live_migration_manager(self) -> LiveMigrationManager:
        if self._live_migration is None:
            raise NotImplementedError("this agent was built without live migration")
        return self._live_migration

    @expose
    async def check_can_live_migrate_destination(
        self, ctxt: RequestContext, instance: Instance, migration: Migration, source_host: str
    ) -> LiveMigrateData:
        return LiveMigrateData.from_driver_data(
            await self.live_migration_manager.check_can_live_migrate_destination(
                ctxt, instance, migration, source_host
            )
        )

    @expose
    async def check_can_live_migrate_source(
        self, ctxt: RequestContext, instance: Instance, dest_check_data: LiveMigrateData
    ) -> LiveMigrateData:
        await self.peers.during(
            ctxt,
            "check_can_live_migrate_source",
            instance.uuid,
            migration_uuid=None,
            caller_is="dest",
        )
        return LiveMigrateData.from_driver_data(
            await self.live_migration_manager.check_can_live_migrate_source(
                ctxt, instance, dest_check_data.to_driver_data()
            )
        )

    @expose
    async def live_migration(
        self,
        ctxt: RequestContext,
        instance: Instance,
        migration: Migration,
        migrate_data: LiveMigrateData,
    ) -> dict[str, Any]:
        return await self.live_migration_manager.live_migration(
            ctxt, instance, migration, migrate_data.to_driver_data()
        )

    @expose
    async def pre_live_migration(
        self,
        ctxt: RequestContext,
        instance: Instance,
        migration: Migration,
        migrate_data: LiveMigrateData,
    ) -> dict[str, Any]:
        await self._from_source(ctxt, "pre_live_migration", instance, migration)
        return await self.live_migration_manager.pre_live_migration(
            ctxt, instance, migration, migrate_data.to_driver_data()
        )

    @expose
    async def post_live_migration_at_destination(
        self, ctxt: RequestContext, instance: Instance, migration: Migration
    ) -> dict[str, Any]:
        await self._from_source(ctxt, "post_live_migration_at_destination", instance, migration)
        return await self.live_migration_manager.post_live_migration_at_destination(
            ctxt, instance, migration
        )

    @expose
    async def rollback_live_migration_at_destination(
        self, ctxt: RequestContext, instance: Instance, migration: Migration
    ) -> None:
        await self._from_source(ctxt, "rollback_live_migration_at_destination", instance, migration)
        await self.live_migration_manager.rollback_live_migration_at_destination(
            ctxt, instance, migration
        )

    @expose
    async def live_migration_abort(
        self, ctxt: RequestContext, migration_uuid: str, reason: str | None = None
    ) -> None:
        await self.live_migration_manager.live_migration_abort(ctxt, migration_uuid, reason)

    @expose
    async def live_migration_force_complete(
        self, ctxt: RequestContext, migration_uuid: str
    ) -> None:
        await self.live_migration_manager.live_migration_force_complete(ctxt, migration_uuid)

    @expose
    async def get_live_migration_guest(
        self, ctxt: RequestContext, instance_uuid: str
    ) -> str | None:
        await self.peers.recovery(ctxt, "get_live_migration_guest", instance_uuid)
        return await self.live_migration_manager.get_live_migration_guest(ctxt, instance_uuid)

    @expose
    async def settle_live_migration_peer(
        self, ctxt: RequestContext, instance: Instance, steps: list[str], owner: str | None
    ) -> None:
        await self.peers.recovery(ctxt, "settle_live_migration_peer", instance.uuid)
        await self.live_migration_manager.settle_live_migration_peer(ctxt, instance, steps, owner)

    async def _from_source(
        self, ctxt: RequestContext, action: str, instance: Instance, migration: Migration
    ) -> None:
        await self.peers.during(
            ctxt, action, instance.uuid, migration_uuid=migration.uuid, caller_is="source"
        )
