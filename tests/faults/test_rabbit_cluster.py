"""Issue 14 acceptance b: Fleet on a three-node RabbitMQ cluster with quorum queues.

A conductor and three agents (real processes, one broker login each, the transport URL listing
all three nodes, ``rabbit_quorum_queue = true``, Fleet's broker policies and limits conf) boot a
storm of instances; mid-storm the node holding most queue leaders and connections is SIGKILLed,
and restarted later. Checked:

- every instance ends ACTIVE, or ERROR with a fault; every build the API accepted exists and is
  final (none lost); the fleet invariants hold (one guest per instance, usage = sum of guests);
- every operator call made meanwhile ended by its deadline (none outlived its timeout);
- ``compute.<host>`` and the conductor topic queue have consumers again, on surviving nodes
  only, while the node is down (``rabbitmqctl list_consumers`` on a survivor);
- the killed node rejoins the cluster after its restart; nothing is left running afterwards.

Timings are printed (``-s``). ``make faults-cluster`` runs it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from campaign.env import FAST_FAILURE_DETECTION, FAST_RECONCILER

from compute_agent.testing_invariants import check_fleet_invariants
from compute_agent.virt.state_view import hypervisor_view
from conductor.db.session import Database
from conductor.tools.cluster import ClusterSpec, LocalCluster
from shared_objects.context import RequestContext
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.instance import Instance, InstanceList
from shared_objects.objects.instance_fault import InstanceFault
from shared_objects.testing.broker_logins import (
    BrokerLimits,
    BrokerLogins,
    NodeCtl,
    plan_setup,
)
from shared_objects.testing.postgres_node import PostgresNode
from shared_objects.testing.rabbit_cluster import RabbitCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

LIMITS_CONF = Path(__file__).resolve().parents[2] / "deploy/rabbitmq/20-fleet-limits.conf"
HOSTS = ("compute-1", "compute-2", "compute-3")
CONDUCTOR_TOPIC = "conductor"
STORM = 45  # instances, in BATCHES boot calls
BATCHES = 9
SPAWN_DELAY = 2.0
KILL_AFTER = 2.0  # seconds into the storm
DOWN_FOR = 25.0  # the killed node stays down this long (consumers checked meanwhile)
SETTLE_WITHIN = 120.0
# The operator client's deadlines (LocalCluster: 30 s for object calls, 60 s for compute-task
# calls): a call still running after its deadline plus SLACK has hung.
CALL_TIMEOUT = 30.0
BOOT_TIMEOUT = 60.0
SLACK = 3.0


@pytest.fixture
async def services() -> AsyncIterator[tuple[RabbitCluster, PostgresNode]]:
    """The broker cluster and a private PostgreSQL (the shared one may be out of connections
    under a full test run), started together; nothing of either left running afterwards."""
    cluster = RabbitCluster(extra_config=LIMITS_CONF.read_text())
    names = cluster.nodenames
    postgres = PostgresNode()
    try:
        async with contextlib.AsyncExitStack() as stack:
            await asyncio.gather(
                stack.enter_async_context(cluster), stack.enter_async_context(postgres)
            )
            yield cluster, postgres
    finally:
        assert not _running_nodes(names), "a cluster node outlived the test"


@pytest.fixture
def rabbit(services: tuple[RabbitCluster, PostgresNode]) -> RabbitCluster:
    return services[0]


def _running_nodes(names: list[str]) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [name for name in names if name in out]


@pytest.fixture(params=[False, True], ids=["classic-replies", "transient-quorum"])
async def fleet(
    request: pytest.FixtureRequest, services: tuple[RabbitCluster, PostgresNode], tmp_path: Path
) -> AsyncIterator[LocalCluster]:
    """Conductor and agents on the cluster; reply and fanout queues classic (exclusive, on the
    node of their connection), or quorum too (``rabbit_transient_quorum_queue``)."""
    rabbit, postgres = services
    vhost = f"fleet-cluster-{uuid.uuid4().hex[:8]}"
    await rabbit.ctl("add_vhost", vhost)
    logins = BrokerLogins.for_node(rabbit, vhost)
    # Fleet's per-queue policies (length limits, TTLs, reject-publish) on quorum queues too.
    await logins.ctl.import_definitions({"policies": logins.policies(BrokerLimits())})
    spec = ClusterSpec(
        database_url=postgres.url,
        transport_url=rabbit.url_for(vhost),
        hosts=HOSTS,
        conductors=1,
        workdir=tmp_path / "cluster",
        messaging={
            "rabbit_quorum_queue": True,
            "rabbit_transient_quorum_queue": request.param,
        },
        common_env={
            "FLEET_COMPUTE__SPAWN_DELAY": str(SPAWN_DELAY),
            **FAST_FAILURE_DETECTION,
            **FAST_RECONCILER,
        },
        report_interval=1.0,
        service_down_time=6.0,
        logins=logins,
    )
    local = LocalCluster(spec)
    try:
        await local.start(timeout=120.0)
        # What `fleetctl broker setup` adds for these logins: per-login connection and channel
        # limits (agents 8 / 64), counted across the cluster.
        ctl = NodeCtl(rabbit)
        plan = plan_setup(logins, await ctl.export_definitions(), BrokerLimits())
        assert any("max-connections" in action for action in plan.actions), plan.actions
        await ctl.import_definitions(plan.definitions)
        await Flavor(
            local.ctxt, name="small", flavorid="small", vcpus=1, memory_mb=512, root_gb=1
        ).create()
        yield local
    finally:
        await local.stop()


class Calls:
    """Operator calls in the background, each timed against its deadline."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self.failures: collections.Counter[str] = collections.Counter()
        self.hung: list[str] = []
        self.first_failure: dict[str, tuple[float, str]] = {}
        self.last_failure: dict[str, float] = {}

    async def timed(self, what: str, call: Any, deadline: float) -> Any:
        started = time.monotonic()
        try:
            async with asyncio.timeout(deadline + SLACK):
                return await call
        except TimeoutError:
            self.hung.append(f"{what} outlived its {deadline:.0f} s deadline")
            return None
        except Exception as exc:  # an error by the deadline is fine: it ended
            self.failures[type(exc).__name__] += 1
            self.first_failure.setdefault(what, (time.monotonic(), repr(exc)[:400]))
            self.last_failure[what] = time.monotonic()
            return None
        finally:
            self.durations.append(time.monotonic() - started)


async def _storm(fleet: LocalCluster, calls: Calls) -> list[str]:
    """BATCHES boot calls, half a second apart; the uuids of every accepted build."""

    async def one(index: int) -> list[str]:
        await asyncio.sleep(index * 0.5)
        made = await calls.timed(
            "build_instances",
            fleet.boot(flavor="small", name=f"storm-{index}", count=STORM // BATCHES),
            BOOT_TIMEOUT,
        )
        return list(made or [])

    batches = await asyncio.gather(*(one(i) for i in range(BATCHES)))
    return [u for batch in batches for u in batch]


async def _poll_reads(fleet: LocalCluster, calls: Calls, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await calls.timed("InstanceList.get_all", InstanceList.get_all(fleet.ctxt), CALL_TIMEOUT)
        await asyncio.sleep(0.2)


def _victim(queues: list[dict[str, Any]], connections: list[dict[str, Any]]) -> str:
    """The node holding the most leaders of Fleet's RPC queues, then the most connections."""
    leaders = collections.Counter(
        q["node"] for q in queues if q["name"] == CONDUCTOR_TOPIC or q["name"].startswith("compute")
    )
    conns = collections.Counter(c["node"] for c in connections)
    return max(set(leaders) | set(conns), key=lambda n: (leaders[n], conns[n]))


async def _consumers_on_survivors(
    rabbit: RabbitCluster, vhost: str, dead: str, within: float
) -> tuple[float, dict[str, list[str]]]:
    """Until compute.<host> and the conductor queue each have a consumer on a live node.

    A quorum queue keeps listing the consumers of a node that went down (marked suspected
    down, their unacknowledged messages returned to the queue) until that node is back or
    forgotten: a consumer listed on the dead node proves nothing, one on a survivor does.
    """
    wanted = {CONDUCTOR_TOPIC, *(f"compute.{h}" for h in HOSTS)}
    started = time.monotonic()
    where: dict[str, list[str]] = {}
    while time.monotonic() - started < within:
        with contextlib.suppress(Exception):  # the survivors may still be electing leaders
            where = collections.defaultdict(list)
            for row in await rabbit.consumers(vhost):
                where[row["queue_name"]].append(row["node"])
            alive = {q for q, nodes in where.items() if any(n and n != dead for n in nodes)}
            if wanted <= alive:
                return time.monotonic() - started, dict(where)
        await asyncio.sleep(0.5)
    raise AssertionError(f"consumers not back on surviving nodes within {within} s: {where}")


async def _settle(fleet: LocalCluster, database: Database, within: float) -> list[Instance]:
    """Every instance in the database final (read directly, never through a conductor)."""
    ctxt = RequestContext(user_id="checker", project_id="admin", is_admin=True)
    deadline = time.monotonic() + within
    found: list[Instance] = []
    while time.monotonic() < deadline:
        async with database.request(ctxt):
            found = list(await InstanceList.get_all(ctxt))
        if all(i.task_state is None and i.vm_state in ("active", "error") for i in found):
            return found
        await asyncio.sleep(1.0)
    states = collections.Counter(f"{i.vm_state}/{i.task_state}" for i in found)
    raise AssertionError(f"instances not final within {within} s: {dict(states)}")


async def test_boot_storm_survives_a_cluster_node_sigkill(
    rabbit: RabbitCluster, fleet: LocalCluster
) -> None:
    vhost = fleet.spec.logins.vhost  # type: ignore[union-attr]
    queues = await rabbit.queues(vhost)
    rpc_queues = {
        q["name"]: q
        for q in queues
        if q["name"] in {CONDUCTOR_TOPIC, *(f"compute.{h}" for h in HOSTS)}
    }
    assert {q["type"] for q in rpc_queues.values()} == {"quorum"}, rpc_queues
    victim = _victim(queues, await rabbit.connections())
    index = rabbit.index_of(victim)

    calls = Calls()
    stop_reads = asyncio.Event()
    reads = asyncio.ensure_future(_poll_reads(fleet, calls, stop_reads))
    storm = asyncio.ensure_future(_storm(fleet, calls))
    started = time.monotonic()
    try:
        await asyncio.sleep(KILL_AFTER)
        await rabbit.kill(index)
        killed_at = time.monotonic()
        consumers_after, where = await _consumers_on_survivors(rabbit, vhost, victim, DOWN_FOR * 2)
        queues_while_down = await rabbit.queues(vhost)
        stale = sum(nodes.count(victim) for q, nodes in where.items() if q in rpc_queues)
        await asyncio.sleep(max(0.0, DOWN_FOR - (time.monotonic() - killed_at)))
        await rabbit.restart(index)
        assert victim in await rabbit.running_nodes()
        accepted = await storm
        database = Database(fleet.spec.database_url)
        try:
            final = await _settle(fleet, database, SETTLE_WITHIN)
            settled = time.monotonic() - started
            ctxt = RequestContext(user_id="checker", project_id="admin", is_admin=True)
            async with database.request(ctxt):
                problems = await check_fleet_invariants(
                    ctxt, await hypervisor_view(fleet.workdir / "hypervisors")
                )
        finally:
            await database.engine.dispose()
    finally:
        stop_reads.set()
        await reads
        if not storm.done():
            storm.cancel()

    for what, (when, text) in calls.first_failure.items():
        print(
            f"\n{what}: failures from {when - killed_at:.1f} to "
            f"{calls.last_failure[what] - killed_at:.1f} s after the kill; first: {text}"
        )
    assert problems == [], problems
    by_uuid = {i.uuid: i for i in final}
    assert set(accepted) <= set(by_uuid), "an accepted build was lost"
    errors = [i for i in final if i.vm_state == "error"]
    for instance in errors:
        fault_row = await InstanceFault.get_latest_for_instance(fleet.ctxt, instance.uuid)
        assert fault_row.message, f"{instance.uuid} is in ERROR without a fault"
    assert calls.hung == [], calls.hung
    leaders_down = sorted(
        {q["name"]: q["node"] for q in queues_while_down if q["name"] in rpc_queues}.items()
    )
    print(
        f"\ncluster start {rabbit.last_start_seconds:.1f} s; killed {victim} "
        f"(leaders of {sum(1 for q in rpc_queues.values() if q['node'] == victim)}"
        f"/{len(rpc_queues)} RPC queues) {KILL_AFTER:.0f} s into the storm; consumers on "
        f"survivors {consumers_after:.1f} s after the kill ({stale} stale ones still listed on "
        f"the dead node); leaders then {leaders_down}; "
        f"restart + rejoin {rabbit.last_restart_seconds:.1f} s\n"
        f"{len(final)} instances ({len(accepted)} accepted by the API): "
        f"{len(final) - len(errors)} active, {len(errors)} error; all final "
        f"{settled:.1f} s after the storm began; operator calls {len(calls.durations)}, "
        f"slowest {max(calls.durations):.1f} s, failed by their deadline {dict(calls.failures)}"
    )
