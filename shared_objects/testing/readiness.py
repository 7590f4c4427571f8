"""The readiness contract both services share (``/readyz``), checked the same way for each.

A service is ready only while it is started, consuming, connected to the broker and not
draining: readiness must turn false at the first moment of a graceful stop, so a load balancer
or orchestrator stops sending work before the drain, not after it.
"""

from __future__ import annotations

from typing import Any, Protocol

from shared_objects.runtime.messaging.memory import MemoryDriver


class _Service(Protocol):
    @property
    def ready(self) -> bool: ...

    transport: Any
    server: Any

    async def start(self) -> None: ...

    async def stop(self, grace: float | None = None) -> None: ...


async def check_ready_follows_lifecycle(service: _Service) -> None:
    """Start, lose and regain the (in-memory) broker, then stop ``service``, checking ``ready``."""
    driver = service.transport.driver
    assert isinstance(driver, MemoryDriver), "needs the in-memory transport"
    assert not service.ready  # not started
    await service.start()
    assert service.ready
    driver.simulate_connection_loss()
    assert not service.ready  # broker link down
    await driver.simulate_reconnect()
    assert service.ready
    seen_while_draining: list[bool] = []
    drain = service.server.stop

    async def stop_server(grace: float = 30.0) -> None:
        seen_while_draining.append(service.ready)
        await drain(grace)

    service.server.stop = stop_server
    await service.stop(grace=1)
    assert seen_while_draining == [False]  # 503 from the first moment of the drain
    assert not service.ready
