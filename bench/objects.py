"""Object benchmark: agent-side ``Instance.get_by_uuid`` + ``save()`` pairs through one conductor
into PostgreSQL, against the same two operations done directly with SQLAlchemy in one process.

    .venv/bin/python bench/objects.py            # 3 rounds x 5 s per cell
    .venv/bin/python bench/objects.py --quick    # 1 round x 2 s per cell
    .venv/bin/python bench/objects.py --json     # one JSON object instead of the table

Setup: a fresh PostgreSQL database (dropped afterwards), migrated; one instance row per worker
so workers never contend on a row (contention is what the CAS test is about, not this one).
Paths, one after the other in each round, the order rotated each round (medians reported):

* ``objects``: this process is the agent (no database access); a ``conductor`` subprocess on a
  private topic and control exchange serves the calls. One pair = two RPC round trips, each
  one autocommitted statement in the conductor; ``save()`` sends only the changed field.
* ``objects_open``: the same traffic to a second topic served by the same conductor process
  with authorisation off (no role check, no ownership scope, no audit lines): ``objects`` /
  ``objects_open`` is what the policy costs (docs/security.md; target: at least 0.95 at c=64).
* ``direct``: the same two statements in this process, executed exactly as the conductor
  executes them on PostgreSQL (the driver path of ``conductor.db.connection``): a connection checked
  out of SQLAlchemy's pool per operation, as each RPC request takes one (at most
  ``--direct-pool`` connections, see ``DIRECT_POOL``); the statement built with SQLAlchemy
  Core and compiled once, then run on the pooled asyncpg connection itself, which prepares it
  and caches it per connection; both in **autocommit** (no ``BEGIN``/``COMMIT``), as the
  conductor runs a read-only request and a save that is the request's only write. The read
  selects every column but the ``flavor`` copy (what ``get_by_uuid`` reads), the write is the
  save's ``UPDATE ... SET progress, updated_at WHERE uuid = $n RETURNING updated_at``. These
  are the unscoped statements (what ``objects_open`` runs): the agent's ownership terms are
  part of what ``objects`` pays, and ``policy_ratio`` measures them. Until 2026-12-07 this path
  ran SQLAlchemy's own execution with each operation in its own transaction (``BEGIN``,
  statement, ``COMMIT``): about four times the CPU per pair of the conductor's way, which
  flattered ``ratio``.

Logins: this process is the agent of ``bench-host`` (its own broker login, created for the run
and deleted afterwards, as every login below); the instances it reads and saves are placed on
that host, so the policy allows them, scoped, as for a real agent. Seeding runs as an operator.

JSON: ``{"objects": {"<c>": {...}}, "objects_open": ..., "direct": {...}, "ratio": {"<c>":
objects/direct}, "cpu_ratio": {"<c>": direct CPU per pair / (agent + conductor CPU per pair)},
"policy_ratio": {"<c>": objects/objects_open}}`` with
``pairs_per_s``, ``p50_ms`` and ``p99_ms`` per cell (medians over rounds).
Compare the ratio of one run; absolute figures on a shared machine mean little.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from objects_conductor import serve_bench_conductor
from objects_layers import layer_costs
from objects_paths import BENCH_HOST, Pair, direct_pair, measure, objects_pair, seed

from conductor.db import migration
from conductor.db.session import create_engine
from conductor.testing import indirection
from shared_objects.context import RequestContext
from shared_objects.exception import ALLOWED_REMOTE_EXMODS
from shared_objects.rpc_clients.conductor import ConductorAPI
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.log import configure_logging
from shared_objects.runtime.messaging import MessagingTimeout, get_transport
from shared_objects.testing.broker_logins import BrokerLogins
from shared_objects.testing.isolation import fresh_database

CONCURRENCIES = (1, 16, 64)
# The direct path's pool. The conductor's may grow to 64, but it held ~27 connections at c=64
# (2026-12-07), and 64 more would overrun the shared server's max_connections (100). A smaller
# pool does not slow the direct path down: at c=64, pools of 16 and 32 gave at least the pairs/s
# of 64 (the slowest, with the shortest tail), so the limit flatters nobody (``--direct-pool``).
DIRECT_POOL = 32
TARGET_RATIO_AT_64 = 0.5
TARGET_POLICY_RATIO_AT_64 = 0.95


AMQP_URL = os.environ.get("FLEET_TEST_TRANSPORT_URL", "rabbit://guest:guest@127.0.0.1:5672/")
BIN = Path(sys.executable).parent


@contextlib.asynccontextmanager
async def conductor_process(
    db_url: str,
    exchange: str,
    topic: str,
    verbose: bool,
    profile: str | None = None,
    *,
    url: str = AMQP_URL,
    security_env: dict[str, str] | None = None,
) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        FLEET_TRANSPORT_URL=url,
        FLEET_CONTROL_EXCHANGE=exchange,
        FLEET_DATABASE_URL=db_url,
        FLEET_HOST=f"bench-conductor-{uuid.uuid4().hex[:6]}",
        FLEET_LOG_LEVEL="warning",
        FLEET_LOG_FORMAT="json",
    )
    env.update(security_env or {})
    # The real conductor, plus the same without authorisation on "<topic>-open".
    argv = [sys.executable, __file__, "--serve-bench-conductor"]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        "--topic",
        topic,
        env=env,
        stdout=None if verbose else asyncio.subprocess.DEVNULL,
        stderr=None if verbose else asyncio.subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def wait_ready(api: ConductorAPI, deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            await api.ping(RequestContext(), 1, wait=1.0)
            return
        except MessagingTimeout:
            if time.monotonic() > end:
                raise


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds = 1 if args.quick else args.rounds
    seconds = 2.0 if args.quick else args.seconds
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    samples: dict[str, dict[int, list[dict[str, float]]]] = {
        "objects": {c: [] for c in concurrencies},
        "objects_open": {c: [] for c in concurrencies},
        "direct": {c: [] for c in concurrencies},
    }
    exchange = f"fleet-bench-{uuid.uuid4().hex[:8]}"
    topic = f"conductor-bench-{uuid.uuid4().hex[:8]}"
    open_topic = f"{topic}-open"
    # One set of logins per conductor topic (an agent may publish only to its conductors').
    logins = BrokerLogins(AMQP_URL, tag=uuid.uuid4().hex[:6], conductor_topic=topic)
    open_logins = BrokerLogins(AMQP_URL, tag=uuid.uuid4().hex[:6], conductor_topic=open_topic)
    agent, operator = logins.host_login(BENCH_HOST), logins.operator_login()
    conductor_login = logins.conductor_login()
    open_agent = open_logins.host_login(BENCH_HOST)
    for each in (logins, open_logins):
        await each.ensure(conductors=[""], operators=[""], hosts=[BENCH_HOST], exchanges=[exchange])
    try:
        async with fresh_database("fleet_bench") as db_url:
            await migration.upgrade(db_url)
            engine = create_engine(db_url, pool_size=args.direct_pool, max_overflow=0)
            conductor = conductor_process(
                db_url,
                exchange,
                topic,
                args.verbose,
                url=logins.url_for(conductor_login),
                security_env=logins.security_env(),
            )
            async with conductor as proc:
                as_agent = get_transport(
                    MessagingConfig(transport_url=logins.url_for(agent), control_exchange=exchange),
                    allowed_remote_exmods=ALLOWED_REMOTE_EXMODS,
                )
                as_operator = get_transport(
                    MessagingConfig(
                        transport_url=logins.url_for(operator), control_exchange=exchange
                    ),
                    allowed_remote_exmods=ALLOWED_REMOTE_EXMODS,
                )
                as_open_agent = get_transport(
                    MessagingConfig(
                        transport_url=open_logins.url_for(open_agent), control_exchange=exchange
                    ),
                    allowed_remote_exmods=ALLOWED_REMOTE_EXMODS,
                )
                async with as_agent, as_open_agent, as_operator:
                    api = ConductorAPI(as_agent, timeout=60.0, topic=topic)
                    open_api = ConductorAPI(as_open_agent, timeout=60.0, topic=open_topic)
                    ops_api = ConductorAPI(as_operator, timeout=60.0, topic=topic)
                    await wait_ready(api)
                    await wait_ready(open_api)
                    ctxt = RequestContext(user_id="bench", project_id="bench")
                    with indirection(ops_api):
                        uuids = await seed(ctxt, max(concurrencies))
                    paths: dict[str, Pair] = {
                        "objects": objects_pair(ctxt, uuids, api),
                        "objects_open": objects_pair(ctxt, uuids, open_api),
                        "direct": direct_pair(engine, uuids),
                    }
                    pids = {"objects": proc.pid, "objects_open": proc.pid}
                    for path in paths.values():  # warm up all: pools, caches, JIT-less paths
                        await measure(path, max(concurrencies), 0.5)
                    names = list(paths)
                    for r in range(rounds):
                        # Rotated each round (bench/rpc.py): a slow phase hits every path alike.
                        order = names[r % len(names) :] + names[: r % len(names)]
                        for c in concurrencies:
                            for name in order:
                                samples[name][c].append(
                                    await measure(paths[name], c, seconds, pids.get(name))
                                )
            await engine.dispose()
            layers = await layer_costs(db_url, 500 if args.quick else 2000)
    finally:
        await logins.delete()
        await open_logins.delete()

    result: dict[str, Any] = {"layers": layers}
    for name, by_c in samples.items():  # objects, objects_open, direct
        result[name] = {
            str(c): {
                key: statistics.median(s[key] for s in runs)
                for key in (
                    "pairs_per_s",
                    "p50_ms",
                    "p99_ms",
                    "cpu_ms_per_pair",
                    "conductor_cpu_ms_per_pair",
                )
            }
            for c, runs in by_c.items()
        }
    result["ratio"] = {
        str(c): result["objects"][str(c)]["pairs_per_s"] / result["direct"][str(c)]["pairs_per_s"]
        for c in concurrencies
    }
    # CPU per pair of this machine's Fleet processes, direct over objects (agent + conductor;
    # the broker and the database are shared and not counted): much steadier than throughput
    # on a loaded machine, where the path with more processes loses more.
    result["cpu_ratio"] = {
        str(c): result["direct"][str(c)]["cpu_ms_per_pair"]
        / (
            result["objects"][str(c)]["cpu_ms_per_pair"]
            + result["objects"][str(c)]["conductor_cpu_ms_per_pair"]
        )
        for c in concurrencies
    }
    result["policy_ratio"] = {
        str(c): result["objects"][str(c)]["pairs_per_s"]
        / result["objects_open"][str(c)]["pairs_per_s"]
        for c in concurrencies
    }
    result["meta"] = {
        "rounds": rounds,
        "seconds_per_cell": seconds,
        "target_ratio_at_64": TARGET_RATIO_AT_64,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loop": type(asyncio.get_running_loop()).__module__,
    }
    return result


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'concurrency':>11} | {'objects pairs/s':>15} | {'p50/p99 ms':>13} | "
        f"{'cpu ms agent/cond':>17} | {'direct pairs/s':>14} | {'p50/p99 ms':>13} | "
        f"{'cpu ms':>6} | {'ratio':>5} | {'cpu ratio':>9}",
    ]
    for c, ratio in result["ratio"].items():
        o, d = result["objects"][c], result["direct"][c]
        cpu_ratio = result.get("cpu_ratio", {}).get(c, float("nan"))
        lines.append(
            f"{c:>11} | {o['pairs_per_s']:>15.0f} | {o['p50_ms']:>6.1f}/{o['p99_ms']:<6.1f} | "
            f"{o['cpu_ms_per_pair']:>8.2f}/{o['conductor_cpu_ms_per_pair']:<8.2f} | "
            f"{d['pairs_per_s']:>14.0f} | {d['p50_ms']:>6.1f}/{d['p99_ms']:<6.1f} | "
            f"{d['cpu_ms_per_pair']:>6.2f} | {ratio:>5.2f} | {cpu_ratio:>9.2f}"
        )
    layers = result.get("layers")
    if layers:
        lines.append(
            "CPU per request in-process, no RPC (us): "
            f"DbApi get {layers['db_get_us']:.0f} vs endpoint get_by_uuid "
            f"{layers['endpoint_get_us']:.0f}; DbApi update {layers['db_update_us']:.0f} vs "
            f"endpoint save {layers['endpoint_save_us']:.0f}"
        )
    for c, ratio in result.get("policy_ratio", {}).items():
        o, p = result["objects"][c], result["objects_open"][c]
        lines.append(
            f"policy on/off at c={c}: {o['pairs_per_s']:.0f} / {p['pairs_per_s']:.0f} pairs/s "
            f"= {ratio:.3f}; conductor cpu ms/pair {o['conductor_cpu_ms_per_pair']:.2f} / "
            f"{p['conductor_cpu_ms_per_pair']:.2f}"
        )
    policy64 = result.get("policy_ratio", {}).get("64")
    if policy64 is not None:
        verdict = "meets" if policy64 >= TARGET_POLICY_RATIO_AT_64 else "MISSES"
        lines.append(
            f"policy ratio at 64 = {policy64:.3f}: {verdict} the target >= "
            f"{TARGET_POLICY_RATIO_AT_64} (authorisation costs at most 5%)"
        )
    at64 = result["ratio"].get("64")
    if at64 is not None:
        verdict = "meets" if at64 >= TARGET_RATIO_AT_64 else "MISSES"
        lines.append(f"ratio at 64 = {at64:.2f}: {verdict} the target >= {TARGET_RATIO_AT_64}")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-bench-conductor" and sys.argv[2] == "--topic":
        serve_bench_conductor(sys.argv[3])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one round of 2 s per cell")
    parser.add_argument("--json", action="store_true", help="print one JSON object, no table")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCIES)))
    parser.add_argument(
        "--direct-pool", type=int, default=DIRECT_POOL, help="direct path's connections"
    )
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="show the conductor's output")
    parser.add_argument("--profile-conductor", metavar="FILE", help="cProfile the conductor")
    args = parser.parse_args()
    # Logs go to stderr, quietly: stdout carries only the table or the JSON object.
    configure_logging("console", "warning")
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None and not args.no_uvloop:
        result = uvloop.run(run(args))
    else:
        result = asyncio.run(run(args))
    print(json.dumps(result) if args.json else table(result))


if __name__ == "__main__":
    main()
