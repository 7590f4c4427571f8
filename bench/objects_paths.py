"""The paths ``objects.py`` compares, as callables of one worker: the object calls through a
conductor, the same two statements done directly; the rows they work on, and the timing loop.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import greenlet_spawn

from conductor.db import asyncpg_exec, models
from shared_objects.base import indirection_api_in_context
from shared_objects.context import RequestContext
from shared_objects.objects import Flavor, Instance
from shared_objects.rpc_clients.conductor import ConductorAPI

BENCH_HOST = "bench-host"


Pair = Callable[[int], Awaitable[None]]


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    pair: Pair, concurrency: int, seconds: float, other_pid: int | None = None
) -> dict[str, float]:
    """Run ``concurrency`` workers doing pairs for ``seconds``; pairs/s, latency and CPU per
    pair of this process (and of ``other_pid``, the conductor, when given)."""
    latencies: list[float] = []
    cpu0 = time.process_time()
    other0 = process_cpu(other_pid) if other_pid else 0.0
    stop_at = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            await pair(index)
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - began
    cpu = time.process_time() - cpu0
    other = process_cpu(other_pid) - other0 if other_pid else 0.0
    latencies.sort()
    count = max(1, len(latencies))
    return {
        "pairs": len(latencies),
        "cpu_ms_per_pair": 1000 * cpu / count,
        "conductor_cpu_ms_per_pair": 1000 * other / count,
        "pairs_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


async def seed(ctxt: RequestContext, count: int) -> list[str]:
    """One instance per worker, created through the conductor."""
    flavor = Flavor(ctxt, name=f"bench-{uuid.uuid4().hex[:6]}", vcpus=1, memory_mb=512, root_gb=1)
    await flavor.create()
    uuids = []
    for i in range(count):
        inst = Instance(
            ctxt,
            name=f"bench-{i}",
            host=BENCH_HOST,
            node="n1",
            flavor=flavor,
            vm_state="active",
            power_state="running",
            image_ref="cirros",
            launch_index=i,
        )
        await inst.create()
        uuids.append(inst.uuid)
    return uuids


def objects_pair(ctxt: RequestContext, uuids: list[str], api: ConductorAPI) -> Pair:
    counter = [0]

    async def pair(index: int) -> None:
        counter[0] += 1
        with indirection_api_in_context(api):
            inst = await Instance.get_by_uuid(ctxt, uuids[index])
            inst.progress = counter[0] % 100
            await inst.save()

    return pair


def direct_pair(engine: AsyncEngine, uuids: list[str]) -> Pair:
    """The conductor's database work for one pair, done directly (module docstring)."""
    table = models.metadata.tables["instances"]
    read = asyncpg_exec.compile_statement(
        select(*(c for c in table.c if c.name != "flavor"))
        .where(table.c.uuid == bindparam("uuid", type_=table.c.uuid.type))
        .limit(1),
        engine.dialect,
    )
    write = asyncpg_exec.compile_statement(
        update(table)
        .where(table.c.uuid == bindparam("uuid", type_=table.c.uuid.type))
        .values(
            progress=bindparam("progress", type_=table.c.progress.type),
            updated_at=bindparam("updated_at", type_=table.c.updated_at.type),
        )
        .returning(table.c.updated_at),
        engine.dialect,
    )
    pool = engine.sync_engine.pool
    counter = [0]

    async def autocommit(stmt: asyncpg_exec.AsyncpgStatement, params: dict[str, Any]) -> Any:
        # One checkout per operation, as one per RPC request in the conductor. The driver
        # connection is never in a transaction here: each statement commits on its own.
        fairy = await greenlet_spawn(pool.connect)
        try:
            return await asyncpg_exec.fetch(fairy.driver_connection, stmt, params)
        finally:
            await greenlet_spawn(fairy.close)

    async def pair(index: int) -> None:
        counter[0] += 1
        (row,) = await autocommit(read, {"uuid": uuids[index]})
        (changed,) = await autocommit(
            write,
            {
                "uuid": row["uuid"],
                "progress": counter[0] % 100,
                "updated_at": datetime.datetime.now(datetime.UTC),
            },
        )
        assert changed["updated_at"] is not None

    return pair
