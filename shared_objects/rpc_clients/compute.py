"""Client of the compute agents' RPC API (used by conductors and by agents talking to peers).

It depends only on the shared contract, so a conductor calls agents without loading agent code;
the server (``compute_agent.endpoint``) takes its target version from here.

Every method picks the newest API version the cap allows (``can_send_version``) and degrades its
arguments for older agents; the cap is the lowest version among live agents (see
``shared_objects.releases``) or the operator's override.
"""

from __future__ import annotations

from typing import Any

import structlog

from shared_objects import releases
from shared_objects.context import RequestContext
from shared_objects.objects.block_device_mapping import BlockDeviceMappingList
from shared_objects.objects.live_migrate_data import LiveMigrateData
from shared_objects.runtime.messaging import (
    RPCClient,
    Serializer,
    Target,
    Transport,
    version_is_compatible,
)
from shared_objects.runtime.messaging.authorization import ReplyFrom
from shared_objects.serializer import FleetObjectSerializer
from shared_objects.upgrade_levels import ComputeUpgradeLevels

log = structlog.get_logger(__name__)

TOPIC = "compute"

# Compute RPC API history:
# 1.0: Initial version: run_instance, terminate_instance, attach_volume, detach_volume,
#      refresh_instance_security_rules, check_can_live_migrate_destination,
#      check_can_live_migrate_source, live_migration, pre_live_migration,
#      post_live_migration_at_destination, rollback_live_migration_at_destination,
#      live_migration_abort, live_migration_force_complete, get_live_migration_guest,
#      settle_live_migration_peer.
# 1.1: live_migration_abort takes a reason (recorded in the migration's fault).
# 1.2: run_instance takes block_device_mappings (BlockDeviceMappingList) and event_started:
#      the conductor hands over the BDMs it has just created and has recorded the
#      compute_run_instance event start itself. The agent still reads the security group rules
#      itself, after taking the instance; refresh_instance_security_rules may now name an
#      instance still being built here (applied once its guest exists), so a rule change made
#      after that read reaches the build.
API_VERSION = "1.2"

# The first version whose run_instance carries the conductor's build extras.
RUN_INSTANCE_EXTRAS_VERSION = "1.2"
# The first version that takes refresh_instance_security_rules for a build in progress.
BUILD_REFRESH_VERSION = "1.2"


def _driver_data(value: Any) -> dict[str, Any]:
    """Migrate data from the wire as the driver's dict (a LiveMigrateData object on the wire)."""
    if isinstance(value, LiveMigrateData):
        return value.to_driver_data()
    raise TypeError(f"expected LiveMigrateData, got {type(value).__name__}")


class ComputeAPI:
    """Typed calls and casts to one compute agent, addressed by host name.

    With ``levels`` (the normal case in services) every call is capped at the oldest live
    agent's RPC version and its object arguments are serialised at the versions of the
    receiving host's release. Without, ``version_cap`` (or none) applies and objects go at
    this release's versions.
    """

    def __init__(
        self,
        transport: Transport,
        serializer: Serializer | None = None,
        *,
        version_cap: str | None = None,
        timeout: float | None = None,
        levels: ComputeUpgradeLevels | None = None,
        reply_from: ReplyFrom | None = None,
    ) -> None:
        self._transport = transport
        self._reply_from = reply_from
        self._serializer = serializer
        self._timeout = timeout
        self._version_cap = version_cap
        self.levels = levels
        self._clients: dict[str, RPCClient] = {}
        self.client = self._client_for(releases.CURRENT)

    def _client_for(self, release: releases.Release) -> RPCClient:
        client = self._clients.get(release.name)
        if client is None:
            serializer = self._serializer
            if serializer is None or release is not releases.CURRENT:
                serializer = FleetObjectSerializer(version_manifest=release.objects)
            client = RPCClient(
                self._transport,
                Target(topic=TOPIC, version=API_VERSION),
                serializer=serializer,
                timeout=self._timeout,
                reply_from=self._reply_from,
            )
            self._clients[release.name] = client
        return client

    @property
    def version_cap(self) -> str | None:
        if self.levels is not None:
            return self.levels.levels.rpc_version_cap
        return self._version_cap

    def set_version_cap(self, cap: str | None) -> None:
        """Pin a cap by hand (used when no automatic levels are configured)."""
        self._version_cap = cap

    def can_send_version(self, version: str) -> bool:
        """Whether every live agent understands ``version`` of the compute API."""
        cap = self.version_cap
        return cap is None or version_is_compatible(cap, version)

    def release_for(self, host: str) -> releases.Release:
        return self.levels.release_for(host) if self.levels else releases.CURRENT

    async def _ready(self) -> None:
        # Agents read the levels on demand: a peer call waits for the first read so that it
        # goes out at the peer's own release, not at the oldest one's (safe, but lossy).
        if self.levels is not None:
            await self.levels.ensure_read()

    def _to(self, host: str, version: str, **opts: Any) -> Any:
        client = self._client_for(self.release_for(host))
        return client.prepare(server=host, version=version, version_cap=self.version_cap, **opts)

    def host_speaks(self, host: str, version: str) -> bool:
        """Whether a message at ``version`` may go to ``host``: within the cap, and ``host``
        itself is known to speak it. The cap alone is not enough: it counts the agents seen at
        the last refresh, and an older agent that registered since would reject the message."""
        return self.can_send_version(version) and version_is_compatible(
            self.release_for(host).compute_rpc_api, version
        )

    def can_send_build_extras(self, host: str) -> bool:
        """Whether ``run_instance`` to ``host`` may carry BDMs and a started event (API 1.2)."""
        return self.host_speaks(host, RUN_INSTANCE_EXTRAS_VERSION)

    async def run_instance(
        self,
        ctxt: RequestContext,
        host: str,
        *,
        instance: Any,
        request_spec: dict[str, Any],
        alternates: list[str],
        attempt: int,
        block_device_mappings: BlockDeviceMappingList | None = None,
        event_started: bool = False,
    ) -> None:
        """Cast the build to ``host``.

        The extras need API 1.2. Below it the 1.0 message goes out and the agent fetches the
        BDMs and records the event start itself, as agents of release 1.0 always do.
        """
        await self._ready()
        args: dict[str, Any] = {
            "instance": instance,
            "request_spec": request_spec,
            "alternates": alternates,
            "attempt": attempt,
        }
        version = "1.0"
        has_extras = block_device_mappings is not None or event_started
        if has_extras and self.can_send_build_extras(host):
            version = RUN_INSTANCE_EXTRAS_VERSION
            args.update(block_device_mappings=block_device_mappings, event_started=event_started)
        elif event_started:
            # The levels changed between the conductor's unit of work and this cast (an older
            # agent came back): that agent records a second start for this attempt.
            log.warning(
                "run_instance_extras_dropped", host=host, cap=self.version_cap, attempt=attempt
            )
        await self._to(host, version).cast(ctxt, "run_instance", **args)

    async def terminate_instance(self, ctxt: RequestContext, host: str, *, instance: Any) -> None:
        await self._ready()
        await self._to(host, "1.0").cast(ctxt, "terminate_instance", instance=instance)

    async def attach_volume(
        self, ctxt: RequestContext, host: str, *, instance: Any, bdm: Any
    ) -> Any:
        await self._ready()
        return await self._to(host, "1.0").call(ctxt, "attach_volume", instance=instance, bdm=bdm)

    async def detach_volume(
        self, ctxt: RequestContext, host: str, *, instance: Any, volume_id: str
    ) -> None:
        await self._ready()
        await self._to(host, "1.0").call(
            ctxt, "detach_volume", instance=instance, volume_id=volume_id
        )

    async def refresh_instance_security_rules(
        self, ctxt: RequestContext, host: str, *, instance: Any
    ) -> None:
        await self._ready()
        await self._to(host, "1.0").cast(ctxt, "refresh_instance_security_rules", instance=instance)

    # --- live migration (compute_agent/live_migration/; docs/live-migration.md) -----------
    # Long calls ask for call-monitor heartbeats: a dead peer is noticed within
    # ``call_monitor_timeout`` while a slow but alive one is never timed out early; ``timeout``
    # stays the overall bound.

    def _long(self, host: str, call_monitor_timeout: float, timeout: float) -> Any:
        return self._to(host, "1.0", call_monitor_timeout=call_monitor_timeout, timeout=timeout)

    async def check_can_live_migrate_destination(
        self,
        ctxt: RequestContext,
        host: str,
        *,
        instance: Any,
        migration: Any,
        source_host: str,
        call_monitor_timeout: float,
        timeout: float,
    ) -> dict[str, Any]:
        """On the destination: can it take the instance? Returns the migrate data."""
        await self._ready()
        result = await self._long(host, call_monitor_timeout, timeout).call(
            ctxt,
            "check_can_live_migrate_destination",
            instance=instance,
            migration=migration,
            source_host=source_host,
        )
        return _driver_data(result)

    async def check_can_live_migrate_source(
        self,
        ctxt: RequestContext,
        host: str,
        *,
        instance: Any,
        dest_check_data: dict[str, Any],
        call_monitor_timeout: float,
        timeout: float,
    ) -> dict[str, Any]:
        """On the source: can the guest leave? Returns the full migrate data."""
        await self._ready()
        result = await self._long(host, call_monitor_timeout, timeout).call(
            ctxt,
            "check_can_live_migrate_source",
            instance=instance,
            dest_check_data=LiveMigrateData.from_driver_data(dest_check_data),
        )
        return _driver_data(result)

    async def live_migration(
        self,
        ctxt: RequestContext,
        host: str,
        *,
        instance: Any,
        migration: Any,
        migrate_data: dict[str, Any],
        call_monitor_timeout: float,
        timeout: float,
    ) -> dict[str, Any]:
        """On the source: run the whole migration; returns its outcome when it ends."""
        await self._ready()
        result: dict[str, Any] = await self._long(host, call_monitor_timeout, timeout).call(
            ctxt,
            "live_migration",
            instance=instance,
            migration=migration,
            migrate_data=LiveMigrateData.from_driver_data(migrate_data),
        )
        return result

    async def pre_live_migration(
        self,
        ctxt: RequestContext,
        host: str,
        *,
        instance: Any,
        migration: Any,
        migrate_data: dict[str, Any],
        call_monitor_timeout: float,
        timeout: float,
    ) -> dict[str, Any]:
        """On the destination: claim and create the paused incoming guest."""
        await self._ready()
        result: dict[str, Any] = await self._long(host, call_monitor_timeout, timeout).call(
            ctxt,
            "pre_live_migration",
            instance=instance,
            migration=migration,
            migrate_data=LiveMigrateData.from_driver_data(migrate_data),
        )
        return result

    async def post_live_migration_at_destination(
        self,
        ctxt: RequestContext,
        host: str,
        *,
        instance: Any,
        migration: Any,
        call_monitor_timeout: float,
        timeout: float,
    ) -> dict[str, Any]:
        """On the destination: resume the guest and take the instance over."""
        await self._ready()
        result: dict[str, Any] = await self._long(host, call_monitor_timeout, timeout).call(
            ctxt, "post_live_migration_at_destination", instance=instance, migration=migration
        )
        return result

    async def rollback_live_migration_at_destination(
        self,
        ctxt: RequestContext,
        host: str,
        *,
        instance: Any,
        migration: Any,
        call_monitor_timeout: float,
        timeout: float,
    ) -> None:
        """On the destination: remove the incoming guest and release its claim."""
        await self._ready()
        await self._long(host, call_monitor_timeout, timeout).call(
            ctxt, "rollback_live_migration_at_destination", instance=instance, migration=migration
        )

    async def live_migration_abort(
        self,
        ctxt: RequestContext,
        host: str,
        *,
        migration_uuid: str,
        timeout: float,
        reason: str | None = None,
    ) -> None:
        """On the source: stop the migration; the guest stays on the source.

        The reason needs API 1.1; while any agent is older it is left out (1.0).
        """
        await self._ready()
        if self.can_send_version("1.1"):
            await self._to(host, "1.1", timeout=timeout).call(
                ctxt, "live_migration_abort", migration_uuid=migration_uuid, reason=reason
            )
            return
        await self._to(host, "1.0", timeout=timeout).call(
            ctxt, "live_migration_abort", migration_uuid=migration_uuid
        )

    async def live_migration_force_complete(
        self, ctxt: RequestContext, host: str, *, migration_uuid: str, timeout: float
    ) -> None:
        """On the source: pause the guest so the copy converges."""
        await self._ready()
        await self._to(host, "1.0", timeout=timeout).call(
            ctxt, "live_migration_force_complete", migration_uuid=migration_uuid
        )

    async def get_live_migration_guest(
        self, ctxt: RequestContext, host: str, *, instance_uuid: str, timeout: float
    ) -> str | None:
        """The guest's phase on ``host``'s hypervisor (None: absent), for recovery."""
        await self._ready()
        result: str | None = await self._to(host, "1.0", timeout=timeout).call(
            ctxt, "get_live_migration_guest", instance_uuid=instance_uuid
        )
        return result

    async def settle_live_migration_peer(
        self,
        ctxt: RequestContext,
        host: str,
        *,
        instance: Any,
        steps: list[str],
        owner: str | None,
        call_monitor_timeout: float,
        timeout: float,
    ) -> None:
        """Recovery: run ``host``'s share of a resolution, then hold a claim iff it owns it."""
        await self._ready()
        await self._long(host, call_monitor_timeout, timeout).call(
            ctxt, "settle_live_migration_peer", instance=instance, steps=steps, owner=owner
        )
