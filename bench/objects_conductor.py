"""The conductor ``objects.py`` runs: a real ``ConductorService`` that also serves the same objects
with authorisation off on a second topic, for the ``objects_open`` baseline (bench only).
"""

from __future__ import annotations

from typing import Any


class _OpenPolicy:
    """Admits every object call unscoped and unaudited: the conductor as it was before
    authorisation, for the ``objects_open`` baseline only."""

    def admit(self, ctxt: Any, objname: str, method: str, *_: Any) -> Any:
        from conductor.object_policy import Admission
        from shared_objects.runtime.identity import Caller, Role

        return Admission(Caller("", Role.CONDUCTOR), f"{objname}.{method}", None, False)


class _BenchConductor:
    """A real conductor (policy on, topic ``T``) that also serves ``T-open`` with authorisation
    off, from the same process and database pool: the two object paths differ only by the
    policy (a second conductor process would double the database connections)."""

    def __init__(self, topic: str) -> None:
        from conductor.indirection import BaseAPIEndpoint, ConductorIndirectionEndpoint
        from conductor.service import ConductorService
        from shared_objects.runtime.config import load_config
        from shared_objects.runtime.log import configure_service_logging
        from shared_objects.runtime.messaging import RPCServer, Target
        from shared_objects.serializer import FleetObjectSerializer

        self.cfg = load_config()
        configure_service_logging(self.cfg, "conductor")
        self.service = ConductorService(self.cfg, topic=topic)
        open_endpoint = ConductorIndirectionEndpoint(self.service.database)
        open_endpoint.policy = _OpenPolicy()  # type: ignore[assignment]
        self.open_server = RPCServer(
            self.service.transport,
            Target(topic=f"{topic}-open", server=self.cfg.host),
            endpoints=[open_endpoint, BaseAPIEndpoint()],
            serializer=FleetObjectSerializer(),
        )
        self.metrics = self.service.metrics

    @property
    def ready(self) -> bool:
        return self.service.ready

    async def start(self) -> None:
        await self.service.start()
        await self.open_server.start()

    async def stop(self, grace: float | None = None) -> None:
        await self.open_server.stop()
        await self.service.stop(grace)

    async def reload(self) -> None:
        await self.service.reload()


def serve_bench_conductor(topic: str) -> None:
    """``--serve-bench-conductor``: see :class:`_BenchConductor` (bench only: the real
    services have no switch that turns authorisation off)."""
    from shared_objects.runtime.service_runner import run, run_service

    conductor = _BenchConductor(topic)
    run(run_service(conductor, conductor.cfg, "conductor"))
