"""Live-migration benchmark: many concurrent live migrations among several agent processes.

    .venv/bin/python bench/migrate.py            # 100 migrations among 4 agents
    .venv/bin/python bench/migrate.py --quick    # 40 migrations
    .venv/bin/python bench/migrate.py --json     # one JSON object instead of the table
    .venv/bin/python bench/migrate.py --driver qemu  # 8 real 128 MB guests, 2 agents

One run starts a real cluster (``conductor.tools.cluster.LocalCluster``: one conductor and
``--agents`` compute agents as separate processes) on the local RabbitMQ, in a private vhost created
and deleted here, and a fresh PostgreSQL database, dropped at the end. Agents use the fast copy
model (``FLEET_COMPUTE__MIGRATION=time_scale=0``: the memory copy costs no simulated time, so what
is measured is Fleet's protocol — prechecks, pre/post calls, CAS saves, progress saves — not a
pretend network) and zero spawn delay.

``--count`` instances are booted evenly over the agents, then every one is live-migrated to the
next agent (host i -> host i+1) with all requests in flight at once. Each Migration's duration
is ``updated_at - created_at`` of its row once finished (both written by the conductor's
database: one clock). Throughput is ``count / (last finished - first created)``. A migration
not ``completed`` within ``--timeout`` seconds counts as stuck.

The conductor's ``/metrics`` is scraped before and after the migrations to count the RPCs it
served per migration, by method (object indirection and compute-task calls).

With ``--driver qemu`` the agents run real guests (``[compute] driver = "qemu"``, TCG here, 128 MB
each, the image of ``make guest-image``): QEMU copies the memory over ``tcp:127.0.0.1``. The same
run first measures the fake driver with the same agents and count (the baseline: Fleet's
protocol alone) and reports the ratios, so what real memory copies add is read from one run on
one machine. Guests outlive agents by design: every QEMU process under the run's state dir is
killed at the end.

The machine this runs on is usually shared and small: compare runs on the same machine only.
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
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from cluster_figures import percentile, scrape_server_calls

from compute_agent.virt.qemu.image import DEFAULT_IMAGE
from compute_agent.virt.qemu.testing import cluster_env, reap_guests
from conductor.tools.cluster import ClusterSpec, LocalCluster
from shared_objects.objects.flavor import Flavor
from shared_objects.runtime.log import configure_logging
from shared_objects.testing.broker_logins import BrokerLogins
from shared_objects.testing.isolation import fresh_database, private_vhost
from shared_objects.testing.rabbit_node import free_port

AMQP_BASE = "rabbit://guest:guest@127.0.0.1:5672/"
FLAVOR = "bench.lm"
FINISHED = {"completed", "failed", "error", "cancelled"}
AGENT_ENV = {
    "FLEET_COMPUTE__VCPUS": "4096",
    "FLEET_COMPUTE__MEMORY_MB": "16777216",
    "FLEET_COMPUTE__DISK_GB": "1048576",
    "FLEET_COMPUTE__SPAWN_DELAY": "0",
    "FLEET_COMPUTE__MIGRATION": "time_scale=0",
}


def _stamp(value: str) -> float:
    return datetime.datetime.fromisoformat(value).timestamp()


async def boot_evenly(
    cluster: LocalCluster,
    hosts: list[str],
    count: int,
    timeout: float = 120,
    image_ref: str | None = None,
) -> dict[str, str]:
    """``{instance uuid: host}`` with ``count`` instances spread round-robin over ``hosts``."""
    per_host = {
        h: count // len(hosts) + (1 if i < count % len(hosts) else 0) for i, h in enumerate(hosts)
    }
    placed: dict[str, str] = {}
    for host, n in per_host.items():
        if n:
            request = {"image_ref": image_ref} if image_ref else {}
            for made in await cluster.boot(
                flavor=FLAVOR, name=f"lm-{host}", count=n, forced_host=host, **request
            ):
                placed[made] = host
    insts = await cluster.wait_instances(list(placed), timeout=timeout)
    failed = [i.uuid for i in insts if i.vm_state != "active"]
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {count} instances did not boot (see the agents' logs)"
        )
    return placed


async def run(
    args: argparse.Namespace, vhost: str, workdir: Path, driver: str = "fake"
) -> dict[str, Any]:
    hosts = [f"compute-{n}" for n in range(1, args.agents + 1)]
    env = {**AGENT_ENV, "FLEET_LOG_LEVEL": args.log_level}
    if driver == "qemu":
        env.update(cluster_env(args.image_dir, args.accel))
    # Every process on its own broker login, as in production (a conductor refuses to run on a
    # login that is not a conductor's, and only an operator may create instances); users are
    # global to the broker, so they are deleted at the end.
    logins = BrokerLogins(AMQP_BASE + vhost, vhost, tag=uuid.uuid4().hex[:6])
    async with (
        fresh_database("fleet_bench_migrate") as database_url,
        contextlib.AsyncExitStack() as stack,
    ):
        stack.push_async_callback(logins.delete)
        spec = ClusterSpec(
            database_url=database_url,
            transport_url=AMQP_BASE + vhost,
            hosts=tuple(hosts),
            conductors=args.conductors,
            workdir=workdir,
            common_env=env,
            logins=logins,
            report_interval=10.0,
            service_down_time=60.0,
        )
        cluster = LocalCluster(spec)
        port = free_port()
        make_handle = cluster.conductor_handle

        def conductor_handle(index: int) -> Any:
            # Only the conductor serves /metrics: its per-method counts are what we read.
            handle = make_handle(index)
            if index == 1:
                handle.env["FLEET_METRICS_PORT"] = str(port)
            return handle

        cluster.conductor_handle = conductor_handle  # type: ignore[method-assign]
        try:
            await cluster.start(timeout=120)
            assert cluster.tasks is not None
            await Flavor(
                cluster.ctxt, name=FLAVOR, flavorid=FLAVOR, vcpus=1, memory_mb=256, root_gb=1
            ).create()
            placed = await boot_evenly(
                cluster,
                hosts,
                args.count,
                timeout=300 if driver == "qemu" else 120,
                image_ref=DEFAULT_IMAGE if driver == "qemu" else None,
            )
            before = await asyncio.to_thread(scrape_server_calls, port)
            started = time.perf_counter()
            migs = await asyncio.gather(
                *(
                    cluster.tasks.live_migrate_instance(
                        cluster.ctxt,
                        instance_uuid=u,
                        host=hosts[(hosts.index(h) + 1) % len(hosts)],
                    )
                    for u, h in placed.items()
                )
            )
            wanted = set(migs)
            deadline = time.perf_counter() + args.timeout
            rows: dict[str, dict[str, Any]] = {}
            while time.perf_counter() < deadline:
                listed = await cluster.tasks.list_migrations(cluster.ctxt, limit=len(migs) + 10)
                rows = {m["uuid"]: m for m in listed if m["uuid"] in wanted}
                if all(rows.get(u, {}).get("status") in FINISHED for u in wanted):
                    break
                await asyncio.sleep(0.1)
            wall = time.perf_counter() - started
            after = await asyncio.to_thread(scrape_server_calls, port)
        finally:
            await cluster.stop()
            # Real guests outlive their agents by design: none outlives the benchmark.
            await asyncio.to_thread(reap_guests, workdir / "hypervisors")
    statuses: dict[str, int] = {}
    for u in wanted:
        status = rows.get(u, {}).get("status", "missing")
        statuses[status] = statuses.get(status, 0) + 1
    done = [rows[u] for u in wanted if rows.get(u, {}).get("status") == "completed"]
    durations = [_stamp(m["updated_at"]) - _stamp(m["created_at"]) for m in done]
    span = (
        max(_stamp(m["updated_at"]) for m in done) - min(_stamp(m["created_at"]) for m in done)
        if done
        else float("nan")
    )
    return {
        "benchmark": "live_migration",
        "mode": (
            f"cluster: {args.conductors} conductor(s) + {args.agents} agents as separate "
            "processes, RabbitMQ + PostgreSQL"
        ),
        "driver": driver,
        "copy_model": (
            f"QEMU ({args.accel}, 128 MB guests, tcp:127.0.0.1)"
            if driver == "qemu"
            else "fast (time_scale=0)"
        ),
        "agents": args.agents,
        "migrations": len(migs),
        "completed": len(done),
        "stuck_or_failed": len(migs) - len(done),
        "statuses": statuses,
        "migrations_per_s": round(len(done) / span, 2) if done and span > 0 else None,
        "p50_s": round(percentile(durations, 50), 3),
        "p99_s": round(percentile(durations, 99), 3),
        "max_s": round(max(durations), 3) if durations else None,
        "client_wall_s": round(wall, 2),
        "conductors": args.conductors,
        # With several conductors this is conductor-1's share only.
        "conductor_rpcs_per_migration": {
            m: round((n - before.get(m, 0.0)) / len(migs), 2)
            for m, n in sorted(after.items())
            if n - before.get(m, 0.0) > 0
        },
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


async def run_with_baseline(args: argparse.Namespace, vhost: str, workdir: Path) -> dict[str, Any]:
    """``--driver qemu``: the fake driver first (same agents, same count), then real guests."""
    baseline = await run(args, vhost, workdir / "fake", "fake")
    result = await run(args, vhost, workdir / "qemu", "qemu")

    def ratio(key: str) -> float | None:
        a, b = result.get(key), baseline.get(key)
        return round(a / b, 2) if a and b else None

    result["baseline_fake"] = {
        k: baseline[k] for k in ("completed", "migrations_per_s", "p50_s", "p99_s", "max_s")
    }
    result["ratio_vs_fake"] = {k: ratio(k) for k in ("migrations_per_s", "p50_s", "p99_s")}
    result["stuck_or_failed"] += baseline["stuck_or_failed"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=None, help="migrations (default 100; qemu: 8)")
    parser.add_argument("--agents", type=int, default=None, help="default 4; qemu: 2")
    parser.add_argument("--driver", choices=("fake", "qemu"), default="fake")
    parser.add_argument(
        "--image-dir",
        default=os.environ.get("FLEET_COMPUTE__QEMU_IMAGE_DIR", "~/.cache/fleet/images"),
    )
    parser.add_argument("--accel", default="tcg", help="qemu: tcg (here), kvm:tcg, kvm")
    parser.add_argument("--conductors", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="40 migrations (qemu: 4)")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keep", action="store_true", help="keep the cluster's logs")
    # info at least: the cluster waits for each agent's `service_ready` line.
    parser.add_argument("--log-level", default="info", help="services' log level")
    args = parser.parse_args()
    args.image_dir = Path(args.image_dir).expanduser()
    qemu = args.driver == "qemu"
    if args.count is None:
        args.count = (4 if args.quick else 8) if qemu else (40 if args.quick else 100)
    if args.agents is None:
        args.agents = 2 if qemu else 4
    configure_logging(level="WARNING")
    workdir = Path(tempfile.mkdtemp(prefix="fleet-bench-migrate-"))
    try:
        with private_vhost("fleet-bench-migrate", required=True) as vhost:
            main_run = run_with_baseline if qemu else run
            result = asyncio.run(main_run(args, vhost, workdir))
    finally:
        if args.keep:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")
    return 0 if result["stuck_or_failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
