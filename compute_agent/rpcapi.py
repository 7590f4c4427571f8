"""Client of the compute agents' RPC API (used by conductors and by agents talking to peers).

The conductor imports this one module from ``compute_agent``: it depends only on
``shared_objects``, so the layering (agents above conductors) keeps holding for everything else.

Every method picks the newest API version the cap allows (``can_send_version``) and degrades its
arguments for older agents; the cap is the lowest version among live agents (see
``shared_objects.releases``) or the operator's override.
"""

from __future__ import annotations

from typing import Any

from shared_objects.context import RequestContext
from shared_objects.messaging import RPCClient, Serializer, Target, Transport

TOPIC = "compute"

# Compute RPC API history:
# 1.0: Initial version: run_instance, terminate_instance, attach_volume, detach_volume,
#      refresh_instance_security_rules.
API_VERSION = "1.0"


class ComputeAPI:
    """Typed calls and casts to one compute agent, addressed by host name."""

    def __init__(
        self,
        transport: Transport,
        serializer: Serializer | None = None,
        *,
        version_cap: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self.client = RPCClient(
            transport,
            Target(topic=TOPIC, version=API_VERSION),
            serializer=serializer,
            version_cap=version_cap,
            timeout=timeout,
        )

    @property
    def version_cap(self) -> str | None:
        return self.client.version_cap

    def set_version_cap(self, cap: str | None) -> None:
        """Apply a new cap (from the automatic refresh or the operator's override)."""
        self.client.version_cap = cap

    def _to(self, host: str, version: str, **opts: Any) -> Any:
        return self.client.prepare(server=host, version=version, **opts)

    async def run_instance(
        self,
        ctxt: RequestContext,
        host: str,
        *,
        instance: Any,
        request_spec: dict[str, Any],
        alternates: list[str],
        attempt: int,
    ) -> None:
        await self._to(host, "1.0").cast(
            ctxt,
            "run_instance",
            instance=instance,
            request_spec=request_spec,
            alternates=alternates,
            attempt=attempt,
        )

    async def terminate_instance(self, ctxt: RequestContext, host: str, *, instance: Any) -> None:
        await self._to(host, "1.0").cast(ctxt, "terminate_instance", instance=instance)

    async def attach_volume(
        self, ctxt: RequestContext, host: str, *, instance: Any, bdm: Any
    ) -> Any:
        return await self._to(host, "1.0").call(ctxt, "attach_volume", instance=instance, bdm=bdm)

    async def detach_volume(
        self, ctxt: RequestContext, host: str, *, instance: Any, volume_id: str
    ) -> None:
        await self._to(host, "1.0").call(
            ctxt, "detach_volume", instance=instance, volume_id=volume_id
        )

    async def refresh_instance_security_rules(
        self, ctxt: RequestContext, host: str, *, instance: Any
    ) -> None:
        await self._to(host, "1.0").cast(ctxt, "refresh_instance_security_rules", instance=instance)
