"""Simulated compute hosts written straight into the database: a service and a compute node row
per host, thousands at a time, for the host view's tests and ``bench/scheduler.py``.

Shipped in the package (not under tests/) so tests and benchmarks load fleets the same way.
The rows look like what an agent leaves behind (``Service.register`` and
``ComputeNode.create``/``save``); nothing runs on these hosts.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, insert, update
from sqlalchemy.ext.asyncio import AsyncEngine

from conductor.db import models
from shared_objects.releases import BINARY_COMPUTE, SERVICE_VERSION

SERVICES = models.metadata.tables["services"]
NODES = models.metadata.tables["compute_nodes"]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def host_names(count: int, prefix: str = "sim") -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(count)]


async def insert_hosts(
    engine: AsyncEngine,
    hosts: Sequence[str],
    *,
    stamp: datetime.datetime | None = None,
    seen: datetime.datetime | None = None,
    vcpus: int = 16,
    memory_mb: int = 65536,
    local_gb: int = 1000,
) -> None:
    """A live compute service (last seen up at ``seen``, default now) and an idle compute node
    per host, both created and last updated at ``stamp`` (default now)."""
    at = stamp or utcnow()
    seen_at = seen or utcnow()
    services = [
        {
            "host": h,
            "binary": BINARY_COMPUTE,
            "topic": "compute",
            "version": SERVICE_VERSION,
            "disabled": False,
            "forced_down": False,
            "last_seen_up": seen_at,
            "report_count": 0,
            "deleted": False,
            "created_at": at,
            "updated_at": at,
        }
        for h in hosts
    ]
    nodes = [
        {
            "uuid": str(uuid.uuid4()),
            "host": h,
            "hypervisor_hostname": h,
            "hypervisor_type": "fake",
            "vcpus": vcpus,
            "memory_mb": memory_mb,
            "local_gb": local_gb,
            "vcpus_used": 0,
            "memory_mb_used": 0,
            "local_gb_used": 0,
            "running_vms": 0,
            "cpu_allocation_ratio": 16.0,
            "ram_allocation_ratio": 1.5,
            "disk_allocation_ratio": 1.0,
            "deleted": False,
            "created_at": at,
            "updated_at": at,
        }
        for h in hosts
    ]
    async with engine.begin() as conn:
        await conn.execute(insert(SERVICES), services)
        await conn.execute(insert(NODES), nodes)


async def report_usage(
    engine: AsyncEngine, usage: dict[str, int], *, stamp: datetime.datetime | None = None
) -> None:
    """What an agent's resource report does: each host's ``memory_mb_used`` and ``updated_at``
    (one statement, executed for every host given)."""
    n = NODES
    stmt = (
        update(n)
        .where(n.c.host == bindparam("h"), n.c.deleted.is_(False))
        .values(memory_mb_used=bindparam("used"), updated_at=bindparam("at"))
    )
    at = stamp or utcnow()
    async with engine.begin() as conn:
        await conn.execute(stmt, [{"h": h, "used": used, "at": at} for h, used in usage.items()])


async def heartbeat(
    engine: AsyncEngine, hosts: Sequence[str], *, stamp: datetime.datetime | None = None
) -> None:
    """A batched heartbeat: ``last_seen_up`` of these hosts' compute services, ``updated_at``
    left alone (as a batched liveness write does)."""
    s = SERVICES
    stmt = (
        update(s)
        .where(s.c.host.in_(bindparam("hosts", expanding=True)), s.c.binary == BINARY_COMPUTE)
        .values(last_seen_up=bindparam("at"))
    )
    async with engine.begin() as conn:
        await conn.execute(stmt, {"hosts": list(hosts), "at": stamp or utcnow()})


async def update_service(
    engine: AsyncEngine, host: str, values: dict[str, Any], *, touch: bool = True
) -> None:
    """Change a host's compute service as ``Service.save`` would (``updated_at`` set unless
    ``touch`` is False, e.g. a soft delete that only sets ``deleted_at``)."""
    s = SERVICES
    stamped = {**values, "updated_at": utcnow()} if touch else dict(values)
    async with engine.begin() as conn:
        await conn.execute(
            update(s).where(s.c.host == host, s.c.binary == BINARY_COMPUTE).values(stamped)
        )


async def delete_node(engine: AsyncEngine, host: str) -> None:
    """Soft-delete a host's compute node as ``ComputeNode.destroy`` does (``deleted_at`` only)."""
    n = NODES
    async with engine.begin() as conn:
        await conn.execute(
            update(n).where(n.c.host == host).values(deleted=True, deleted_at=utcnow())
        )
