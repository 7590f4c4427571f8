"""Scale benchmark: what N simulated hosts cost 1 or 2 conductors, against the floor of 0 hosts.

    .venv/bin/python bench/scale.py --hosts 1000                # floor, then 1,000 hosts
    .venv/bin/python bench/scale.py --quick                     # floor, then 100 hosts
    .venv/bin/python bench/scale.py --sweep --conductors 1,2    # N = 0, 10, 100, 1000, each
    .venv/bin/python bench/scale.py --hosts 100 --json          # one JSON object per run

Every run is a fresh setup: a new database on the shared PostgreSQL (dropped after), 1 or 2
real conductor processes (``python -m conductor`` through ``conductor.cluster.LocalCluster``),
and N simulated hosts. A host is the real ``ComputeAgentService``: its own broker login
(``BrokerLogins``, created for all hosts in one batch), AMQP connection and ``compute.<host>``
queue and consumer, fake hypervisor (zero spawn delay), claims, Service heartbeat and periodic
tasks at the default intervals; many hosts share a process (``bench/scale_worker.py``,
``--hosts-per-worker``). The broker is a private RabbitMQ node (``RabbitNode``: its memory is
the run's alone, and it takes a connection per host beyond the shared node's descriptor limit),
or with ``--shared-broker`` a private vhost on the shared one, with tagged logins. Everything is
removed at the end, also on Ctrl-C, SIGTERM or failure.

Each run measures, in order:

1. start: seconds until every agent has started (services and compute nodes registered);
2. steady state, after ``--settle`` s, over ``--window`` s (default 30: every periodic task of
   an agent, the 10 s heartbeat and the 30 s upgrade-levels refresh, runs in it): CPU of each
   conductor and of the agent processes (``/proc/<pid>/stat``, % of one core), PostgreSQL
   transactions/s of the run's database, RSS of every process, the broker's connections, queues
   and memory;
3. under that background: ``--schedule-probes`` sequential ``build_instances`` of one instance
   (the call returns once the conductor has scheduled, recorded and cast it), then
   ``--interactive-probes`` rounds of ``Instance.get_by_uuid`` and of ``InstanceList.get_all``
   (what ``fleetctl list`` calls), each timed at the operator;
4. a boot storm of N instances over the N hosts (``--storm-concurrency`` requests of one
   instance in flight): instances/s until the last is ACTIVE, time to ACTIVE (``updated_at -
   created_at`` of the row, the conductor's clock), instances not in a final state after
   ``--storm-timeout`` (stuck), in ERROR, and reschedules: the ``compute_run_instance`` events
   that ended in error, and among them those whose claim failed (``InsufficientResources``:
   the conductor placed on usage that was stale).

Every phase is bounded (``--start-timeout``, ``--probe-budget``, ``--storm-timeout``): when
the conductors cannot keep up, what did not happen in time is counted and reported (agents
not registered, probe errors, failed build requests, stuck instances), and the run completes.

The conductors' database pools are bounded through their handler concurrency
(``--conductor-concurrency``, default 32 each): PostgreSQL here allows 100 connections in all.

The machine is shared and small: compare figures of one run (N against the floor), not
absolute figures across runs. ``docs/scale.md`` has the method and the measured table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
from boot import AMQP_BASE
from cluster_figures import (
    cpu_seconds,
    percentile,
    plain_dsn,
    scrape_server_calls,
    start_profilers,
    stop_profilers,
)

from conductor.cluster import ClusterSpec, LocalCluster
from shared_objects.exception import FleetException
from shared_objects.log import configure_logging
from shared_objects.messaging import MessagingError
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.instance import Instance, InstanceList
from shared_objects.testing.broker_logins import BrokerLogins
from shared_objects.testing.isolation import fresh_database, private_vhost
from shared_objects.testing.rabbit_node import RabbitNode, free_port

HERE = Path(__file__).resolve().parent
EXCHANGE = "fleet-bench-scale"
FLAVOR = "bench.tiny"
SWEEP = (0, 10, 100, 1000)
FINAL_STATES = ("active", "error", "stopped")
#: Keys every run's JSON object has (the smoke test checks them).
REQUIRED_KEYS = (
    "hosts",
    "conductors",
    "conductor_cpu_percent",
    "interactive_p99_ms",
    "schedule_p99_ms",
    "boot_storm_instances_per_s",
    "stuck_instances",
)


_T0 = time.monotonic()


def progress(message: str) -> None:
    """One line on stderr with the seconds since the benchmark started (long runs)."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def host_names(count: int) -> list[str]:
    return [f"sim-{n:04d}" for n in range(1, count + 1)]


# --- processes -----------------------------------------------------------------------------------


def rss_mb(pid: int | None) -> float | None:
    """Resident set size of ``pid`` in MiB (None once it is gone)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclasses.dataclass
class Worker:
    name: str
    hosts: list[str]
    proc: asyncio.subprocess.Process
    log_path: Path
    report: dict[str, Any] | None = None


async def start_workers(
    args: argparse.Namespace, logins: BrokerLogins, hosts: list[str], workdir: Path
) -> list[Worker]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        {
            "FLEET_CONTROL_EXCHANGE": EXCHANGE,
            # Satisfies the configuration check; each agent gets its own login's URL.
            "FLEET_TRANSPORT_URL": logins.admin_url,
            "FLEET_COMPUTE__SPAWN_DELAY": "0",
            "FLEET_COMPUTE__STATE_DIR": str(workdir / "hypervisors"),
            "FLEET_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
            **logins.security_env(),
        }
    )
    if args.agent_levels_refresh is not None:
        env["FLEET_UPGRADE_LEVELS__REFRESH_INTERVAL"] = str(args.agent_levels_refresh)
    workers: list[Worker] = []
    per = args.hosts_per_worker
    for index, start in enumerate(range(0, len(hosts), per), 1):
        chunk = hosts[start : start + per]
        name = f"worker-{index}"
        hosts_file = workdir / f"{name}.hosts.json"
        urls = {h: logins.url_for(logins.host_login(h)) for h in chunk}
        fd = os.open(hosts_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:  # the logins' passwords: private to this user
            json.dump(urls, f)
        log_path = workdir / f"{name}.log"
        log_file = await asyncio.to_thread(open, log_path, "ab")
        with log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(HERE / "scale_worker.py"),
                "--hosts-file",
                str(hosts_file),
                "--start-concurrency",
                str(args.start_concurrency),
                "--log-level",
                args.agent_log_level,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                preexec_fn=_die_with_parent,
            )
        workers.append(Worker(name, chunk, proc, log_path))
    return workers


async def wait_workers(workers: Sequence[Worker], timeout: float) -> tuple[int, bool]:
    """Until every worker has reported its start, at most ``timeout``: (agents that failed to
    start, whether the wait timed out). A saturated conductor makes starts slow or fail: the
    run goes on and reports it (it fails only if a worker died)."""

    async def one(worker: Worker) -> None:
        assert worker.proc.stdout is not None
        line = await worker.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{worker.name} exited {await worker.proc.wait()}: see its log")
        worker.report = json.loads(line)

    if not workers:
        return 0, False
    tasks = [asyncio.ensure_future(one(w)) for w in workers]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()  # a worker that died fails the run
    reports = [w.report for w in workers if w.report]
    failed = sum(r["failed"] for r in reports)
    if failed:
        progress(f"agents failed to start: {[r['errors'][:2] for r in reports if r['failed']]}")
    if pending:
        progress(f"{len(pending)} worker(s) still starting agents after {timeout:.0f}s")
    return int(failed), bool(pending)


async def stop_workers(workers: Sequence[Worker], timeout: float = 120.0) -> None:
    """SIGTERM (each stops its agents: they mark their services down), SIGKILL after ``timeout``."""
    for worker in workers:
        if worker.proc.returncode is None:
            worker.proc.send_signal(signal.SIGTERM)

    async def wait(worker: Worker) -> None:
        try:
            await asyncio.wait_for(worker.proc.wait(), timeout)
        except TimeoutError:
            worker.proc.kill()
            await worker.proc.wait()

    await asyncio.gather(*(wait(w) for w in workers))


# --- broker and database figures -----------------------------------------------------------------


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


# --- one run -------------------------------------------------------------------------------------


def cpu_percent(before: dict[str, float], after: dict[str, float], seconds: float) -> list[float]:
    return [round((after[k] - before[k]) * 100 / seconds, 1) for k in sorted(before)]


def pids(cluster: LocalCluster, conductors: int, workers: Sequence[Worker]) -> dict[str, int]:
    out = {}
    for index in range(1, conductors + 1):
        pid = cluster.pid_of(f"conductor-{index}")
        if pid is not None:
            out[f"conductor-{index}"] = pid
    out.update({w.name: w.proc.pid for w in workers})
    return out


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


async def boot_storm(
    args: argparse.Namespace,
    cluster: LocalCluster,
    dsn: str,
    count: int,
    procs: dict[str, int],
    ports: Sequence[int],
) -> dict[str, Any]:
    assert cluster.tasks is not None
    tasks = cluster.tasks
    pending = iter(range(count))
    uuids: list[str] = []

    failed_requests = 0

    unsent = 0
    loop = asyncio.get_running_loop()
    # Requests too are sent within the storm's bound: saturated conductors answer each in tens
    # of seconds, and 1,000 of them would take far longer than the bound.
    send_until = loop.time() + args.storm_timeout

    async def operator() -> None:
        nonlocal failed_requests, unsent
        for n in pending:
            if loop.time() > send_until:
                unsent += 1
                continue
            try:
                made = await tasks.build_instances(cluster.ctxt, flavor=FLAVOR, name=f"storm-{n}")
            except (MessagingError, FleetException):
                failed_requests += 1  # e.g. no reply within the deadline: saturated conductors
                continue
            uuids.extend(m["uuid"] for m in made)

    cpu_before = {k: cpu_seconds(p) for k, p in procs.items()}
    calls_before = await asyncio.to_thread(served_calls, ports)
    started_at = time.time()
    await asyncio.gather(*(operator() for _ in range(args.storm_concurrency)))
    # A request whose reply came too late may still have created its instance: count every
    # storm instance the database holds, not only those the replies named.
    uuids = await storm_uuids(dsn)
    stuck = await wait_final(dsn, uuids, max(30.0, send_until - loop.time()))
    cpu_used = {k: cpu_seconds(p) - cpu_before[k] for k, p in procs.items()}
    storm_window = time.time() - started_at
    calls_after = await asyncio.to_thread(served_calls, ports)
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT vm_state, task_state, host, created_at, updated_at FROM instances "
            "WHERE uuid = ANY($1::text[])",
            uuids,
        )
        events = await conn.fetch(
            "SELECT e.result, coalesce(e.traceback, '') || coalesce(e.details, '') AS why "
            "FROM instance_action_events e JOIN instance_actions a ON a.id = e.action_id "
            "WHERE a.instance_uuid = ANY($1::text[]) AND e.event = 'compute_run_instance' "
            "AND e.finish_time IS NOT NULL AND e.result IS DISTINCT FROM 'Success'",
            uuids,
        )
    finally:
        await conn.close()
    active = [r for r in rows if r["vm_state"] == "active" and r["task_state"] is None]
    to_active = [(r["updated_at"] - r["created_at"]).total_seconds() * 1000 for r in active]
    last = max((r["updated_at"].timestamp() for r in active), default=started_at)
    per_host: dict[str, int] = {}
    for r in active:
        per_host[r["host"]] = per_host.get(r["host"], 0) + 1
    return {
        "boot_storm_instances": count,
        "boot_storm_failed_requests": failed_requests,
        "boot_storm_unsent_requests": unsent,
        "boot_storm_instances_per_s": round(len(active) / max(last - started_at, 1e-3), 1),
        "boot_storm_p50_ms": ms(percentile(to_active, 50)),
        "boot_storm_p99_ms": ms(percentile(to_active, 99)),
        "active_instances": len(active),
        "error_instances": sum(1 for r in rows if r["vm_state"] == "error"),
        "stuck_instances": stuck,
        "reschedules": len(events),
        "stale_usage_reschedules": sum(1 for e in events if "InsufficientResources" in e["why"]),
        # CPU per instance, background included (a machine-independent view of the storm).
        "boot_storm_cpu_ms_per_instance": {
            "conductors": round(
                sum(v for k, v in cpu_used.items() if k.startswith("conductor-")) * 1000 / count, 1
            ),
            "agents": round(
                sum(v for k, v in cpu_used.items() if k.startswith("worker-")) * 1000 / count, 1
            ),
        },
        "boot_storm_window_s": round(storm_window, 1),
        "boot_storm_calls_per_instance": calls_rate(calls_before, calls_after, count),
        "hosts_used": len(per_host),
        "max_instances_per_host": max(per_host.values(), default=0),
    }


async def run_one(
    args: argparse.Namespace,
    logins: BrokerLogins,
    workdir: Path,
    hosts: int,
    conductors: int,
) -> dict[str, Any]:
    """One run on a fresh database and conductors; the broker (URL, vhost, rabbitmqctl) is
    ``logins``'s, and every login it needs must exist already."""
    rundir = workdir / f"h{hosts}-c{conductors}"
    rundir.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        db_url = await stack.enter_async_context(fresh_database("fleet_bench_scale"))
        dsn = plain_dsn(db_url)
        spec = ClusterSpec(
            database_url=db_url,
            transport_url=logins.admin_url,
            control_exchange=EXCHANGE,
            hosts=(),
            conductors=conductors,
            workdir=rundir,
            common_env={
                "FLEET_LOG_LEVEL": args.log_level,
                # Each handler holds at most one pooled connection: this bounds the pool too.
                "FLEET_MESSAGING__MAX_CONCURRENCY": str(args.conductor_concurrency),
            },
            # The defaults, as deployed (ClusterSpec's own are shortened for tests).
            report_interval=10.0,
            service_down_time=60.0,
            logins=logins,
        )
        cluster = LocalCluster(spec)
        # Each conductor serves /metrics on its own port: its RPCs served, by method.
        ports = {index: free_port() for index in range(1, conductors + 1)}
        plain_handle = cluster.conductor_handle

        def conductor_handle(index: int) -> Any:
            handle = plain_handle(index)
            handle.env["FLEET_METRICS_PORT"] = str(ports[index])
            return handle

        cluster.conductor_handle = conductor_handle  # type: ignore[method-assign]
        stack.push_async_callback(cluster.stop)
        progress(f"{hosts} hosts, {conductors} conductor(s): starting the conductors")
        await cluster.start(timeout=120)
        await Flavor(
            cluster.ctxt, name=FLAVOR, flavorid=FLAVOR, vcpus=1, memory_mb=64, root_gb=1
        ).create()
        began = time.monotonic()
        progress(f"starting {hosts} agents")
        workers = await start_workers(args, logins, host_names(hosts), rundir)
        # Before the conductors stop (LIFO), timed: agents mark their services down on the way.
        stack.callback(progress, "agents stopped; conductors stopping")
        stack.push_async_callback(stop_workers, workers)
        failed, timed_out = await wait_workers(workers, timeout=args.start_timeout)
        progress(f"workers report their agents started ({time.monotonic() - began:.1f}s)")
        registered = await wait_registered(dsn, hosts - failed, timeout=0 if timed_out else 60)
        start_s = time.monotonic() - began
        progress(f"agents started in {start_s:.1f}s; steady state")
        await asyncio.sleep(args.settle)
        procs = pids(cluster, conductors, workers)
        profilers = (
            start_profilers(cluster, Path(args.profile) / f"h{hosts}-c{conductors}")
            if args.profile
            else []
        )
        result: dict[str, Any] = {
            "hosts": hosts,
            "conductors": conductors,
            "workers": len(workers),
            "agents_failed_to_start": failed,
            "agents_registered": registered,
            "start_timed_out": timed_out,
            "agent_levels_refresh_s": args.agent_levels_refresh or 30.0,
            "start_s": round(start_s, 1),
        }
        try:
            result.update(await steady_state(args, logins, dsn, procs, list(ports.values())))
        finally:
            await asyncio.to_thread(stop_profilers, profilers)
        progress(f"conductor CPU {result['conductor_cpu_percent']} %; probes")
        result.update(await probes(args, cluster, dsn, hosts))
        if hosts:
            progress(f"boot storm of {hosts}")
            result.update(await boot_storm(args, cluster, dsn, hosts, procs, list(ports.values())))
            result["rss_after_storm_mb"] = {k: rss_mb(p) for k, p in procs.items()}
        else:
            result.update(
                boot_storm_instances=0, boot_storm_instances_per_s=None, stuck_instances=0
            )
        result["db_rows"] = await db_rows(dsn)
        progress("stopping")
    progress("stopped")
    return result


# --- the whole benchmark -------------------------------------------------------------------------


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return "?"
    return out.stdout.strip() or "?"


def with_derived(result: dict[str, Any], floor: dict[str, Any] | None) -> dict[str, Any]:
    """Per-host figures: the run's conductor CPU above the floor's, per 100 hosts and per host."""
    total = sum(result["conductor_cpu_percent"])
    result["conductor_cpu_percent_total"] = round(total, 1)
    # Per host of those that were up in the window (a saturated start leaves some out).
    hosts = result.get("agents_registered", result["hosts"])
    if hosts and floor is not None:
        above = total - sum(floor["conductor_cpu_percent"])
        result["conductor_cpu_percent_per_100_hosts"] = round(above * 100 / hosts, 2)
        # % of one core = 10,000 µs of CPU per second.
        result["conductor_cpu_us_per_host_s"] = round(above * 10_000 / hosts, 1)
        result["agents_cpu_us_per_host_s"] = round(result["agents_cpu_percent"] * 10_000 / hosts, 1)
        workers = [v for k, v in result["rss_mb"].items() if k.startswith("worker-") and v]
        result["agent_rss_kb_per_host"] = round(sum(workers) * 1024 / hosts, 0)
        storm = result.get("boot_storm_cpu_ms_per_instance")
        if storm is not None:
            # The storm's conductor CPU less the steady-state background over the same time.
            count = result["boot_storm_instances"]
            background = total / 100 * result["boot_storm_window_s"] * 1000 / count
            result["boot_storm_conductor_cpu_ms_per_instance_net"] = round(
                storm["conductors"] - background, 1
            )
    return result


async def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    plan = [(c, n) for c in args.conductor_list for n in args.host_list]
    results: list[dict[str, Any]] = []
    stamp = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
    }
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fleet-bench-scale-"))
    ok = False
    async with contextlib.AsyncExitStack() as stack:
        tag = uuid.uuid4().hex[:6]
        if args.shared_broker:
            progress("private vhost on the shared broker, broker logins")
            vhost = stack.enter_context(private_vhost("fleet-bench-scale", required=True))
            logins = BrokerLogins(AMQP_BASE + vhost, vhost, tag=tag)
        else:
            # A node of our own: its memory is ours alone, and it inherits this process's file
            # descriptor limit (the shared node's allows ~800 connections; one host is one).
            progress("private RabbitMQ node, broker logins")
            node = await stack.enter_async_context(RabbitNode(start_timeout=180))
            logins = BrokerLogins.for_node(node, tag=tag)
        stack.push_async_callback(logins.delete)
        # Every login of the whole run in one batch (one rabbitmqctl start, whatever the count).
        await logins.ensure(
            conductors=[str(n) for n in range(1, max(args.conductor_list) + 1)],
            operators=[""],
            hosts=host_names(max(args.host_list)),
            exchanges=[EXCHANGE],
        )
        floors: dict[int, dict[str, Any]] = {}
        try:
            for conductors, hosts in plan:
                result = await run_one(args, logins, workdir, hosts, conductors)
                result = with_derived({**stamp, **result}, floors.get(conductors))
                if hosts == 0:
                    floors[conductors] = result
                results.append(result)
                if args.json:
                    print(json.dumps(result), flush=True)
                else:
                    progress(f"run done: {hosts} hosts, {conductors} conductor(s)")
            ok = True
        finally:
            if not ok:
                print(f"bench/scale.py: failed; logs kept in {workdir}", file=sys.stderr)
    if ok and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def _cell(result: dict[str, Any], key: str) -> str:
    value = result.get(key)
    return "-" if value is None else str(value)


def render(results: list[dict[str, Any]]) -> str:
    if not results:
        return "no runs"
    first = results[0]
    lines = [
        f"scale: {first.get('date', '?')}, commit {first.get('commit', '?')}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "",
        f"{'hosts':>5} {'cond':>4} {'start s':>7} {'cond CPU %':>12} {'/100 hosts':>10} "
        f"{'µs/host/s':>9} {'agents %':>8} {'get p50/p99 ms':>15} {'list p99':>8} "
        f"{'sched p50/p99 ms':>17} {'storm inst/s':>12} {'storm p99 ms':>12} "
        f"{'stuck':>5} {'resched':>7} {'stale':>5}",
    ]
    for r in results:
        f = functools.partial(_cell, r)
        cpu = "+".join(f"{c:g}" for c in r["conductor_cpu_percent"])
        lines.append(
            f"{r['hosts']:>5} {r['conductors']:>4} {r['start_s']:>7} {cpu:>12} "
            f"{f('conductor_cpu_percent_per_100_hosts'):>10} "
            f"{f('conductor_cpu_us_per_host_s'):>9} {f('agents_cpu_percent'):>8} "
            f"{f('interactive_p50_ms'):>7}/{f('interactive_p99_ms'):<7} {f('list_p99_ms'):>8} "
            f"{f('schedule_p50_ms'):>8}/{f('schedule_p99_ms'):<8} "
            f"{f('boot_storm_instances_per_s'):>12} {f('boot_storm_p99_ms'):>12} "
            f"{f('stuck_instances'):>5} {f('reschedules'):>7} {f('stale_usage_reschedules'):>5}"
        )
    lines += ["", "RSS MiB, broker and database (steady state):"]
    for r in results:
        rss = ", ".join(f"{k} {v}" for k, v in r["rss_mb"].items())
        b = r["broker"]
        broker = (
            f"{b['connections']} connections, {b['queues']} queues "
            f"({b['queue_memory_mb']} MiB), node {b['node_memory_mb']} MiB"
            if b
            else "not measured"
        )
        lines.append(
            f"  {r['hosts']:>5} hosts, {r['conductors']} cond: {rss}; broker: {broker}; "
            f"db: {r['db_per_s']['xacts']} xact/s, rows {r['db_rows']}; "
            f"load {r['load_avg_1m']}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/scale.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hosts", type=int, default=1000, help="simulated hosts (default 1000)")
    parser.add_argument("--quick", action="store_true", help="100 hosts")
    parser.add_argument("--sweep", action="store_true", help=f"N = {', '.join(map(str, SWEEP))}")
    parser.add_argument("--no-floor", action="store_true", help="skip the 0-host baseline")
    parser.add_argument("--conductors", default="1", help="1, 2, or 1,2 (each in turn)")
    parser.add_argument("--json", action="store_true", help="one JSON object per run")
    parser.add_argument(
        "--shared-broker",
        action="store_true",
        help="a private vhost on 127.0.0.1:5672 instead of a private RabbitMQ node",
    )
    parser.add_argument("--hosts-per-worker", type=int, default=250)
    parser.add_argument("--start-concurrency", type=int, default=25, help="per worker")
    parser.add_argument("--conductor-concurrency", type=int, default=32)
    parser.add_argument("--settle", type=float, default=10.0, help="s after start, unmeasured")
    parser.add_argument("--window", type=float, default=30.0, help="steady-state window, s")
    parser.add_argument("--schedule-probes", type=int, default=20)
    parser.add_argument("--interactive-probes", type=int, default=100)
    parser.add_argument("--storm-concurrency", type=int, default=32)
    parser.add_argument(
        "--start-timeout", type=float, default=300.0, help="s; then measure what started"
    )
    parser.add_argument(
        "--probe-budget", type=float, default=180.0, help="s per kind of probe at most"
    )
    parser.add_argument("--storm-timeout", type=float, default=300.0)
    parser.add_argument("--log-level", default="info", help="conductors' log level")
    parser.add_argument("--agent-log-level", default="warning", help="simulated hosts' level")
    parser.add_argument(
        "--agent-levels-refresh",
        type=float,
        metavar="S",
        help="agents' [upgrade_levels] refresh_interval (default: the deployed 30 s); each "
        "refresh reads every compute service, so its cost grows with the square of the hosts",
    )
    parser.add_argument(
        "--no-broker-stats",
        dest="broker_stats",
        action="store_false",
        help="skip the rabbitmqctl queries (connections, queues, memory)",
    )
    parser.add_argument("--workdir", help="keep logs here (default: a temporary directory)")
    parser.add_argument(
        "--profile", metavar="DIR", help="py-spy (if installed) the conductors in the window"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.hosts = 100
    hosts = list(SWEEP) if args.sweep else [args.hosts]
    if not args.no_floor and 0 not in hosts:
        hosts.insert(0, 0)
    args.host_list = hosts
    try:
        args.conductor_list = [int(c) for c in args.conductors.split(",")]
    except ValueError:
        parser.error("--conductors: 1, 2 or 1,2")
    if any(c < 1 for c in args.conductor_list) or any(h < 0 for h in hosts):
        parser.error("--conductors must be >= 1 and --hosts >= 0")
    if args.hosts_per_worker < 1 or args.start_concurrency < 1:
        parser.error("--hosts-per-worker and --start-concurrency must be at least 1")
    if args.schedule_probes < 1 or args.interactive_probes < 1:
        parser.error("--schedule-probes and --interactive-probes must be at least 1")
    return args


async def _main(args: argparse.Namespace) -> list[dict[str, Any]]:
    # SIGTERM unwinds like Ctrl-C: every process, database, login and the vhost is cleaned up.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await bench(args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("console", "warning", stream=sys.stderr)
    try:
        results = asyncio.run(_main(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench/scale.py: interrupted; cleaned up", file=sys.stderr)
        return 130
    if not args.json:
        print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
