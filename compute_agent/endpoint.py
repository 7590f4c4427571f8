"""The agent's RPC endpoint: the compute API, dispatched to the manager that owns each call."""

from __future__ import annotations

from typing import Any

from compute_agent.build import BuildManager
from compute_agent.rpcapi import API_VERSION
from compute_agent.security_groups import SecurityGroupManager
from compute_agent.volumes import VolumeManager
from shared_objects.context import RequestContext
from shared_objects.messaging import Target, expose
from shared_objects.objects.block_device_mapping import BlockDeviceMapping
from shared_objects.objects.instance import Instance


class ComputeEndpoint:
    target = Target(version=API_VERSION)

    def __init__(
        self, build: BuildManager, volumes: VolumeManager, security: SecurityGroupManager
    ) -> None:
        self.build = build
        self.volumes = volumes
        self.security = security

    @expose
    async def run_instance(
        self,
        ctxt: RequestContext,
        instance: Instance,
        request_spec: dict[str, Any],
        alternates: list[str],
        attempt: int,
    ) -> None:
        await self.build.run_instance(ctxt, instance, request_spec, alternates, attempt)

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
