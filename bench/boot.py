"""Boot benchmark: instances/s through the real build flow against the indirection-path floor.

    .venv/bin/python bench/boot.py            # 500 instances over 4 agents, 3 rounds, median
    .venv/bin/python bench/boot.py --quick    # 100 instances, 1 round
    .venv/bin/python bench/boot.py --json     # one JSON object instead of the table

One run starts a real cluster (``conductor.tools.cluster.LocalCluster``: one conductor and
``--agents`` compute agents as separate processes, zero spawn delay, generous capacity) on the local
RabbitMQ, in a private vhost created and deleted here, every process on its own broker login
(created for the run and deleted at the end), and a fresh PostgreSQL database, dropped at the end.
Two paths then go through the same conductor, one after the other, in rounds (``--rounds``,
default 3, quick 1) with the path order rotated each round; every figure is the median over the
rounds (as in ``bench/rpc.py``), so a slow phase of a shared machine hits every path alike:

- ``floor``: ``bench/boot_floor.py``, a process whose ``FleetObject.indirection_api`` is a
  ``ConductorAPI`` (on the cluster's operator login: only an operator may create instances; the
  build's saves run as the agents, under their ownership scope, ~2-3% more conductor
  instructions per call, docs/performance.md "Authorisation"), issues per instance the object
  calls a build needs at minimum: one
  ``Instance.create`` and the three compare-and-swap saves (scheduling → block_device_mapping →
  spawning → active), ``--concurrency`` instances in flight.
- ``build``: the operator (this process) calls the compute-task API ``build_instances`` (one
  instance per request unless ``--batch``, ``--concurrency`` requests in flight), the conductor
  schedules, records and casts ``run_instance``, and the agents claim, spawn and save, as in
  production.

``ratio`` is the build's median instances/s over the floor's; ``ratio_per_round`` pairs the two
paths within each round (same phase of the machine), and its median is printed too.

For each path, throughput is ``count / (last instance ACTIVE - first request sent)`` and the time to
ACTIVE of an instance is ``updated_at - created_at`` of its row once ACTIVE (both written by the
conductor at the create and at the save that made it ACTIVE: one clock, microseconds). The
conductor's ``/metrics`` is scraped around each path to count the RPCs it served per instance,
by method.
Target: build >= 0.5x the floor's instances/s.

``--decompose`` adds a third path, ``calls``: the floor client issuing every object call the build
flow makes per instance (``boot_floor.py --calls full``), which splits the gap between the floor
and the build into "more object calls" and "the flow itself" (scheduling, casts, agents).

``--profile DIR`` records the conductor and every agent with py-spy during the build path.

The machine this runs on is usually shared and small: compare the ratio of one run, never
absolute figures across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from cluster_figures import (
    calls_delta,
    instance_times,
    per_instance,
    plain_dsn,
    scrape_server_calls,
    service_cpu,
    shared_cpu,
    start_profilers,
    stop_profilers,
    summarize,
)

from conductor.tools.cluster import ClusterSpec, LocalCluster
from shared_objects.objects.flavor import Flavor
from shared_objects.runtime.log import configure_logging
from shared_objects.testing.broker_logins import BrokerLogins
from shared_objects.testing.isolation import fresh_database, private_vhost
from shared_objects.testing.rabbit_node import free_port

HERE = Path(__file__).resolve().parent
AMQP_BASE = "rabbit://guest:guest@127.0.0.1:5672/"
TARGET = 0.5
# "calls" (only with --decompose): every object call of the build, without the build flow.
PATHS = ("floor", "calls", "build")
FLAVOR = "bench.tiny"
# Capacity far above what a run needs: the benchmark measures the flow, not the scheduler saying no.
AGENT_CAPACITY = {
    "FLEET_COMPUTE__VCPUS": "4096",
    "FLEET_COMPUTE__MEMORY_MB": "16777216",
    "FLEET_COMPUTE__DISK_GB": "1048576",
}

try:
    import uvloop  # noqa: F401

    HAVE_UVLOOP = True
except ImportError:
    HAVE_UVLOOP = False


async def run_floor(
    cluster: LocalCluster,
    args: argparse.Namespace,
    prefix: str,
    count: int,
    calls: str = "minimal",
) -> dict[str, Any]:
    argv = [
        sys.executable,
        str(HERE / "boot_floor.py"),
        "--url",
        # Creating instances is an operator's call (an agent login may not insert them).
        cluster.operator_url,
        "--exchange",
        cluster.spec.control_exchange,
        "--flavor",
        FLAVOR,
        "--count",
        str(count),
        "--concurrency",
        str(args.concurrency),
        "--prefix",
        prefix,
        "--calls",
        calls,
        *(["--uvloop"] if HAVE_UVLOOP else []),
    ]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=args.timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"floor client exited {proc.returncode}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def run_build(
    cluster: LocalCluster, args: argparse.Namespace, prefix: str, count: int
) -> tuple[float, list[str]]:
    """Boot ``count`` instances through ``build_instances``; (first request time, uuids)."""
    assert cluster.tasks is not None
    tasks = cluster.tasks
    batch = max(1, args.batch)
    pending = iter(range(0, count, batch))
    uuids: list[str] = []

    async def operator() -> None:
        for n in pending:
            made = await tasks.build_instances(
                cluster.ctxt, flavor=FLAVOR, name=f"{prefix}-{n}", count=min(batch, count - n)
            )
            uuids.extend(m["uuid"] for m in made)

    started_at = time.time()
    await asyncio.gather(*(operator() for _ in range(args.concurrency)))
    return started_at, uuids


async def wait_active(dsn: str, uuids: list[str], timeout: float) -> None:
    """Until every instance is ACTIVE (fails on ERROR or after ``timeout``)."""
    conn = await asyncpg.connect(dsn)
    deadline = time.monotonic() + timeout
    try:
        while True:
            rows = await conn.fetch(
                "SELECT vm_state, task_state, count(*) AS n FROM instances "
                "WHERE uuid = ANY($1::text[]) GROUP BY vm_state, task_state",
                uuids,
            )
            states = {(r["vm_state"], r["task_state"]): r["n"] for r in rows}
            if states.get(("active", None), 0) == len(uuids):
                return
            if any(vm == "error" for vm, _ in states):
                await asyncio.sleep(2.0)  # the fault row follows the ERROR save
                faults = await conn.fetch(
                    "SELECT DISTINCT message FROM instance_faults "
                    "WHERE instance_uuid = ANY($1::text[])",
                    uuids,
                )
                reasons = [f["message"] for f in faults]
                raise RuntimeError(f"instances in ERROR: {states}; faults: {reasons}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not all ACTIVE within {timeout}s: {states}")
            await asyncio.sleep(0.25)
    finally:
        await conn.close()


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    hosts = tuple(f"compute-{n}" for n in range(1, args.agents + 1))
    conductor_port = free_port()
    with private_vhost("fleet-bench-boot", required=True) as vhost:
        # Every process on its own broker login, as in production (a conductor refuses to run
        # on a login that is not a conductor's); users are global: deleted at the end.
        logins = BrokerLogins(AMQP_BASE + vhost, vhost, tag=uuid.uuid4().hex[:6])
        async with (
            fresh_database("fleet_bench_boot") as db_url,
            contextlib.AsyncExitStack() as stack,
        ):
            stack.push_async_callback(logins.delete)
            dsn = plain_dsn(db_url)
            workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fleet-bench-boot-"))
            spec = ClusterSpec(
                database_url=db_url,
                transport_url=AMQP_BASE + vhost,
                control_exchange="fleet-bench",
                hosts=hosts,
                workdir=workdir,
                common_env={
                    "FLEET_COMPUTE__SPAWN_DELAY": "0",
                    "FLEET_LOG_LEVEL": args.log_level,
                    **AGENT_CAPACITY,
                },
                logins=logins,
                report_interval=10.0,
                service_down_time=60.0,
            )
            cluster = LocalCluster(spec)
            # Only the conductor serves /metrics: its per-method counts are what we read.
            orig_handle = cluster.conductor_handle

            def conductor_handle(index: int) -> Any:
                handle = orig_handle(index)
                handle.env["FLEET_METRICS_PORT"] = str(conductor_port)
                # It starts before any agent and so caps compute RPC at the oldest release
                # until its next refresh (30 s by default, longer than a quick run): refresh
                # every second so the run measures the current API. Only the conductor: the
                # agents' refreshes are object calls it would count as served RPCs.
                handle.env["FLEET_UPGRADE_LEVELS__REFRESH_INTERVAL"] = "1"
                return handle

            cluster.conductor_handle = conductor_handle  # type: ignore[method-assign]
            try:
                await cluster.start(timeout=120)
                await Flavor(
                    cluster.ctxt, name=FLAVOR, flavorid=FLAVOR, vcpus=1, memory_mb=64, root_gb=1
                ).create()
                measured = await measure(cluster, args, dsn, conductor_port)
            except BaseException:
                print(f"bench/boot.py: run failed; service logs kept in {workdir}", file=sys.stderr)
                raise
            finally:
                codes = await cluster.stop()
                clean = all(c == 0 for c in codes.values())
                if not clean:
                    print(f"unclean exits {codes}; logs in {workdir}", file=sys.stderr)
            if not args.workdir and clean:
                shutil.rmtree(workdir, ignore_errors=True)
            return measured


async def measure(
    cluster: LocalCluster, args: argparse.Namespace, dsn: str, port: int
) -> dict[str, Any]:
    count = args.count
    # Warm-up: both paths once at a small scale (connections, caches, lazy imports).
    _, warm = await run_build(cluster, args, "warm", args.warmup)
    await wait_active(dsn, warm, args.timeout)
    await run_floor(cluster, args, "warmfloor", args.warmup)
    results: dict[str, Any] = {}
    calls: dict[str, dict[str, float]] = {}
    paths = [p for p in PATHS if p != "calls" or args.decompose]
    for round_no in range(1, args.rounds + 1):
        shift = (round_no - 1) % len(paths)
        for path in paths[shift:] + paths[:shift]:
            prefix = f"{path}{round_no}"
            before = await asyncio.to_thread(scrape_server_calls, port)
            cpu_before = service_cpu(cluster)
            shared_before = await asyncio.to_thread(shared_cpu)
            if path in ("floor", "calls"):
                mode = "minimal" if path == "floor" else "full"
                floor = await run_floor(cluster, args, prefix, count, mode)
                times = await instance_times(dsn, "name ~ $1", f"^{prefix}-[0-9]+$")
                figures = summarize(count, floor["started_at"], times)
                client_cpu = float(floor["cpu_s"])
            else:
                client_started = time.process_time()
                profilers = (
                    start_profilers(cluster, Path(args.profile))
                    if args.profile and round_no == 1
                    else []
                )
                try:
                    started_at, uuids = await run_build(cluster, args, prefix, count)
                    await wait_active(dsn, uuids, args.timeout)
                finally:
                    stop_profilers(profilers)
                client_cpu = time.process_time() - client_started
                times = await instance_times(dsn, "uuid = ANY($1::text[])", uuids)
                figures = summarize(count, started_at, times)
            calls[path] = await calls_delta(port, before)
            cpu_after = service_cpu(cluster)
            shared_after = await asyncio.to_thread(shared_cpu)
            figures["shared_cpu_ms_per_instance"] = {
                name: round((shared_after[name] - shared_before[name]) * 1000 / count, 2)
                for name in shared_after
            }
            figures["cpu_ms_per_instance"] = {
                **{
                    role: round((cpu_after[role] - cpu_before[role]) * 1000 / count, 2)
                    for role in cpu_after
                },
                "client": round(client_cpu * 1000 / count, 2),
            }
            results.setdefault(path, []).append(figures)
    return report(args, results, calls)


def report(
    args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], calls: dict[str, Any]
) -> dict[str, Any]:
    def median_of(path: str) -> dict[str, Any]:
        runs = results[path]
        nested = ("cpu_ms_per_instance", "shared_cpu_ms_per_instance")
        merged: dict[str, Any] = {
            k: statistics.median(r[k] for r in runs) for k in runs[0] if k not in nested
        }
        for key in nested:
            merged[key] = {
                name: round(statistics.median(r[key][name] for r in runs), 2)
                for name in runs[0][key]
            }
        merged["rounds"] = len(runs)
        merged["conductor_rpcs_per_instance"] = per_instance(calls[path], args.count)
        return merged

    floor, build = median_of("floor"), median_of("build")
    ratio = build["instances_per_s"] / floor["instances_per_s"]
    # Same round, same phase of the machine: the spread of these shows what the median hides.
    per_round = [
        round(b["instances_per_s"] / f["instances_per_s"], 2)
        for f, b in zip(results["floor"], results["build"], strict=True)
    ]
    extra = {"calls": median_of("calls")} if "calls" in results else {}
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "count": args.count,
        "agents": args.agents,
        "concurrency": args.concurrency,
        "batch": args.batch,
        "floor": floor,
        **extra,
        "build": build,
        "rounds": args.rounds,
        "ratio": round(ratio, 2),
        "ratio_per_round": per_round,
        "ratio_per_round_median": statistics.median(per_round),
        "target": TARGET,
        "met": ratio >= TARGET,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "uvloop": HAVE_UVLOOP,
            "load_avg_1m_at_end": round(load, 2),
        },
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"boot: {result['count']} instances, {result['agents']} agents, "
        f"concurrency {result['concurrency']}, {result['batch']} per build request, "
        f"median of {result['rounds']} round(s), {result['date']}",
        "",
        f"{'path':<6} {'inst/s':>8} {'elapsed s':>10} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}",
    ]
    paths = [p for p in PATHS if p in result]
    for path in paths:
        r = result[path]
        lines.append(
            f"{path:<6} {r['instances_per_s']:>8} {r['elapsed_s']:>10} {r['p50_ms']:>9} "
            f"{r['p99_ms']:>9} {r['max_ms']:>9}"
        )
    verdict = "met" if result["met"] else "MISSED"
    lines += [
        "",
        f"build / floor: {result['ratio']}x (target >= {result['target']}x: {verdict}); "
        f"per round: {', '.join(f'{r}x' for r in result['ratio_per_round'])} "
        f"(median {result['ratio_per_round_median']}x)",
        "",
        "conductor RPCs served per instance:",
    ]
    for path in paths:
        per = result[path]["conductor_rpcs_per_instance"]
        total = round(sum(per.values()), 2)
        detail = ", ".join(f"{m} {n}" for m, n in per.items())
        lines.append(f"  {path}: {total} ({detail})")
    lines += ["", "CPU ms per instance (conductor + agents + client = total):"]
    for path in paths:
        cpu = result[path]["cpu_ms_per_instance"]
        total = round(sum(cpu.values()), 1)
        shared = result[path]["shared_cpu_ms_per_instance"]
        lines.append(
            f"  {path}: {cpu['conductor']} + {cpu['agents']} + {cpu['client']} = {total}"
            f"   (shared: rabbitmq {shared['rabbitmq']}, postgres {shared['postgres']})"
        )
    lines.append(f"machine: {result['machine']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/boot.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="100 instances instead of 500")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--count", type=int, help="instances per path (default 500, quick 100)")
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--batch", type=int, default=1, help="instances per build request")
    parser.add_argument(
        "--rounds", type=int, help="rounds, order rotated, median reported (default 3, quick 1)"
    )
    parser.add_argument("--warmup", type=int, default=20, help="instances per path before timing")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per path")
    parser.add_argument("--log-level", default="info", help="services' log level")
    parser.add_argument("--workdir", help="keep the cluster's logs here")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the services (build path)")
    parser.add_argument(
        "--decompose",
        action="store_true",
        help="also path 'calls': all the build's object calls through the floor client",
    )
    args = parser.parse_args(argv)
    if args.count is None:
        args.count = 100 if args.quick else 500
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.count < 1 or args.agents < 1 or args.concurrency < 1 or args.rounds < 1:
        parser.error("--count, --agents, --concurrency and --rounds must be at least 1")
    configure_logging("console", "warning", stream=sys.stderr)
    result = asyncio.run(bench(args))
    print(json.dumps(result) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
