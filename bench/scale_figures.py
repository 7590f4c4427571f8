"""What ``scale.py`` measures: broker and database figures, the RPCs conductors served, CPU, the
steady state of N hosts and the probes (a build, a read) against it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
from cluster_figures import cpu_seconds, percentile, scrape_server_calls
from scale_workers import FINAL_STATES, FLAVOR, rss_mb

from conductor.tools.cluster import LocalCluster
from shared_objects.exception import FleetException
from shared_objects.objects.instance import Instance, InstanceList
from shared_objects.runtime.messaging import MessagingError
from shared_objects.testing.broker_logins import BrokerLogins


async def broker_figures(logins: BrokerLogins) -> dict[str, Any]:
    """Connections and queues of the run's vhost, their queues' memory, the node's memory."""
    ctl, vhost = logins.ctl.run, logins.vhost
    listing = await ctl("list_queues", "-p", vhost, "name", "memory", "messages")
    # Data lines only (a private node's rabbitmqctl also prints a banner and a header).
    queues = [
        parts
        for parts in (line.split("\t") for line in listing.splitlines())
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit()
    ]
    conns = (await ctl("list_connections", "vhost")).splitlines()
    status_text = await ctl("status", "--formatter", "json")
    status = json.loads(status_text[status_text.find("{") :] or "{}")
    total = status.get("memory", {}).get("total", {})
    return {
        "connections": sum(1 for line in conns if line.strip() == vhost),
        "queues": len(queues),
        "queue_memory_mb": round(sum(int(q[1]) for q in queues) / 2**20, 1),
        # Requests waiting for a conductor: more than a handful means they are saturated.
        "conductor_queue_messages": sum(int(q[2]) for q in queues if q[0].startswith("conductor")),
        "node_memory_mb": round(int(total.get("rss", 0)) / 2**20, 1),
    }


async def db_counters(dsn: str) -> dict[str, float]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT xact_commit + xact_rollback AS xacts, tup_returned + tup_fetched AS reads, "
            "tup_inserted + tup_updated + tup_deleted AS writes "
            "FROM pg_stat_database WHERE datname = current_database()"
        )
    finally:
        await conn.close()
    assert row is not None
    return {k: float(row[k]) for k in ("xacts", "reads", "writes")}


async def db_rows(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return {
            table: int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
            for table in ("services", "compute_nodes", "instances", "instance_action_events")
        }
    finally:
        await conn.close()


async def wait_registered(dsn: str, hosts: int, timeout: float) -> int:
    """Until ``hosts`` compute services and compute nodes exist (agents register both), at
    most ``timeout``; returns how many hosts have both."""
    conn = await asyncpg.connect(dsn)
    deadline = time.monotonic() + timeout
    try:
        while True:
            services = await conn.fetchval(
                "SELECT count(*) FROM services WHERE \"binary\" = 'fleet-compute'"
            )
            nodes = await conn.fetchval("SELECT count(*) FROM compute_nodes")
            if (services >= hosts and nodes >= hosts) or time.monotonic() > deadline:
                return int(min(services, nodes))
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


def served_calls(ports: Sequence[int]) -> dict[str, float]:
    """RPCs the conductors served so far, by method (their ``/metrics``), summed."""
    total: dict[str, float] = {}
    for port in ports:
        for method, n in scrape_server_calls(port).items():
            total[method] = total.get(method, 0.0) + n
    return total


def calls_rate(before: dict[str, float], after: dict[str, float], per: float) -> dict[str, float]:
    """Calls by method between two scrapes, divided by ``per`` (busiest first)."""
    rates = {m: (n - before.get(m, 0.0)) / per for m, n in after.items()}
    ranked = sorted(((m, r) for m, r in rates.items() if r > 0), key=lambda mr: -mr[1])
    return {m: round(r, 2) for m, r in ranked}


def cpu_percent(before: dict[str, float], after: dict[str, float], seconds: float) -> list[float]:
    return [round((after[k] - before[k]) * 100 / seconds, 1) for k in sorted(before)]


async def steady_state(
    args: argparse.Namespace,
    logins: BrokerLogins,
    dsn: str,
    procs: dict[str, int],
    ports: Sequence[int],
) -> dict[str, Any]:
    conductors = {k: v for k, v in procs.items() if k.startswith("conductor-")}
    workers = {k: v for k, v in procs.items() if k.startswith("worker-")}
    cpu_before = {k: cpu_seconds(p) for k, p in procs.items()}
    db_before = await db_counters(dsn)
    calls_before = await asyncio.to_thread(served_calls, ports)
    began = time.monotonic()
    await asyncio.sleep(args.window)
    cpu_after = {k: cpu_seconds(p) for k, p in procs.items()}
    seconds = time.monotonic() - began
    calls_after = await asyncio.to_thread(served_calls, ports)
    db_after = await db_counters(dsn)
    per_conductor = cpu_percent(
        {k: cpu_before[k] for k in conductors}, {k: cpu_after[k] for k in conductors}, seconds
    )
    agents = sum(cpu_percent({k: cpu_before[k] for k in workers}, cpu_after, seconds))
    broker = await broker_figures(logins) if args.broker_stats else {}
    return {
        "window_s": round(seconds, 1),
        "conductor_cpu_percent": per_conductor,
        "agents_cpu_percent": round(agents, 1),
        "db_per_s": {k: round((db_after[k] - db_before[k]) / seconds, 1) for k in db_before},
        "conductor_calls_per_s": calls_rate(calls_before, calls_after, seconds),
        # The shared broker's RSS is in "broker" (node_memory_mb): other users' share included.
        "rss_mb": {k: rss_mb(p) for k, p in procs.items()},
        "broker": broker,
        "load_avg_1m": round(os.getloadavg()[0], 1),
    }


async def probes(
    args: argparse.Namespace, cluster: LocalCluster, dsn: str, hosts: int
) -> dict[str, Any]:
    """Scheduling and interactive latencies under the background (sequential, one at a time).

    Each kind stops at its count or after ``--probe-budget`` seconds, whichever comes first
    (a saturated conductor answers in tens of seconds); calls that fail are counted."""
    assert cluster.tasks is not None
    loop = asyncio.get_running_loop()
    schedule_ms: list[float] = []
    uuids: list[str] = []
    errors = 0
    deadline = loop.time() + args.probe_budget
    for n in range(args.schedule_probes):
        if loop.time() > deadline:
            break
        began = time.perf_counter()
        try:
            made = await cluster.tasks.build_instances(
                cluster.ctxt, flavor=FLAVOR, name=f"probe-{n}"
            )
        except (MessagingError, FleetException):
            errors += 1
            continue
        schedule_ms.append((time.perf_counter() - began) * 1000)
        uuids.extend(m["uuid"] for m in made)
    await wait_final(dsn, uuids, 120.0)
    get_ms: list[float] = []
    list_ms: list[float] = []
    deadline = loop.time() + args.probe_budget
    for _ in range(args.interactive_probes if uuids else 0):
        if loop.time() > deadline:
            break
        target = random.choice(uuids)
        try:
            began = time.perf_counter()
            await Instance.get_by_uuid(cluster.ctxt, target)
            get_ms.append((time.perf_counter() - began) * 1000)
            began = time.perf_counter()
            await InstanceList.get_all(cluster.ctxt)
            list_ms.append((time.perf_counter() - began) * 1000)
        except (MessagingError, FleetException):
            errors += 1
        await asyncio.sleep(0.05)
    return {
        "schedule_p50_ms": ms(percentile(schedule_ms, 50)),
        "schedule_p99_ms": ms(percentile(schedule_ms, 99)),
        "schedule_samples": len(schedule_ms),
        "interactive_p50_ms": ms(percentile(get_ms, 50)),
        "interactive_p99_ms": ms(percentile(get_ms, 99)),
        "interactive_samples": len(get_ms),
        "list_p50_ms": ms(percentile(list_ms, 50)),
        "list_p99_ms": ms(percentile(list_ms, 99)),
        "list_instances": len(uuids),
        "probe_errors": errors,
    }


def ms(value: float) -> float | None:
    """Milliseconds to one decimal; None (JSON null) when there was no sample."""
    return None if math.isnan(value) else round(value, 1)


async def wait_final(dsn: str, uuids: list[str], timeout: float) -> int:
    """Until every instance is in a final state or ``timeout``; returns how many are not."""
    conn = await asyncpg.connect(dsn)
    deadline = time.monotonic() + timeout
    try:
        while True:
            settled = await conn.fetchval(
                "SELECT count(*) FROM instances WHERE uuid = ANY($1::text[]) "
                "AND vm_state = ANY($2::text[]) AND task_state IS NULL",
                uuids,
                list(FINAL_STATES),
            )
            if settled == len(uuids) or time.monotonic() > deadline:
                return len(uuids) - int(settled)
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def storm_uuids(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT uuid FROM instances WHERE name LIKE 'storm-%'")
    finally:
        await conn.close()
    return [r["uuid"] for r in rows]
