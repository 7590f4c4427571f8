"""Scale benchmark: what N simulated hosts cost 1 or 2 conductors, against the floor of 0 hosts.

    .venv/bin/python bench/scale.py --hosts 1000                # floor, then 1,000 hosts
    .venv/bin/python bench/scale.py --quick                     # floor, then 100 hosts
    .venv/bin/python bench/scale.py --sweep --conductors 1,2    # N = 0, 10, 100, 1000, each
    .venv/bin/python bench/scale.py --hosts 100 --json          # one JSON object per run

Every run is a fresh setup: a new database on the shared PostgreSQL (dropped after), 1 or 2
real conductor processes (``python -m conductor`` through ``conductor.tools.cluster.LocalCluster``),
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
import datetime
import json
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
from boot import AMQP_BASE
from cluster_figures import cpu_seconds, percentile, plain_dsn, start_profilers, stop_profilers
from scale_figures import (
    calls_rate,
    db_rows,
    ms,
    probes,
    served_calls,
    steady_state,
    storm_uuids,
    wait_final,
    wait_registered,
)
from scale_report import commit, render, with_derived
from scale_workers import (
    EXCHANGE,
    FLAVOR,
    host_names,
    pids,
    progress,
    rss_mb,
    start_workers,
    stop_workers,
    wait_workers,
)

from conductor.tools.cluster import ClusterSpec, LocalCluster
from shared_objects.exception import FleetException
from shared_objects.objects.flavor import Flavor
from shared_objects.runtime.log import configure_logging
from shared_objects.runtime.messaging import MessagingError
from shared_objects.testing.broker_logins import BrokerLogins
from shared_objects.testing.isolation import fresh_database, private_vhost
from shared_objects.testing.rabbit_node import RabbitNode, free_port

SWEEP = (0, 10, 100, 1000)


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
