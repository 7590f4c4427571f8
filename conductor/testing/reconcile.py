"""Test kit of the reconciler: a database in a chosen state and a recording fake of the
agents' API, shipped with the package like ``conductor.testing``.

``World`` builds rows directly (services, compute nodes, instances, actions, migrations) and ages
them, so each rule can be driven without agents; casts are recorded by ``FakeCompute`` (which can
be told to refuse a host as a mandatory publish to a missing queue would).

    async with reconcile_world("sqlite+aiosqlite:///x.db") as world:
        await world.host("dead", up=False)
        uuid = await world.instance(host="dead", task_state="spawning", age=60)
        await world.reconciler().run_pass()
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import uuid as uuidlib
from collections.abc import AsyncIterator
from typing import Any

from conductor.db import migration
from conductor.db.session import Database
from conductor.reconcile import Bounds, Reconciler
from conductor.tasks.build import BuildTask
from conductor.tasks.build_placement import BuildSettings
from shared_objects.context import RequestContext
from shared_objects.objects.instance_action import InstanceAction
from shared_objects.releases import BINARY_COMPUTE
from shared_objects.runtime.messaging import MessageUndeliverable


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclasses.dataclass
class Cast:
    host: str
    instance_uuid: str
    attempt: int
    request_id: str


class FakeCompute:
    """The conductor's client of the agents, recording ``run_instance`` and
    ``terminate_instance`` casts (the latter as (host, instance uuid, request id))."""

    def __init__(self) -> None:
        self.casts: list[Cast] = []
        self.terminates: list[tuple[str, str, str]] = []
        self.unroutable: set[str] = set()

    def can_send_build_extras(self, host: str) -> bool:
        return False

    async def run_instance(self, ctxt: RequestContext, host: str, **kwargs: Any) -> None:
        if host in self.unroutable:
            raise MessageUndeliverable(f"no queue compute.{host}")
        self.casts.append(Cast(host, kwargs["instance"].uuid, kwargs["attempt"], ctxt.request_id))

    async def terminate_instance(self, ctxt: RequestContext, host: str, **kwargs: Any) -> None:
        if host in self.unroutable:
            raise MessageUndeliverable(f"no queue compute.{host}")
        self.terminates.append((host, kwargs["instance"].uuid, ctxt.request_id))


@dataclasses.dataclass
class World:
    database: Database
    compute: FakeCompute
    build: BuildTask
    bounds: Bounds

    def reconciler(self, **overrides: Any) -> Reconciler:
        bounds = dataclasses.replace(self.bounds, **overrides)
        # Hosts are judged from the first pass: the rows say how long each was silent.
        return Reconciler(self.database, self.build, bounds, interval=0, trust_after=0)

    async def _ctxt(self) -> Any:
        return RequestContext(user_id="admin", project_id="p1", is_admin=True)

    async def host(self, name: str, *, up: bool = True, marked_down: bool = False) -> None:
        """A compute service and node with room for a few instances."""
        now = utcnow()
        seen: datetime.datetime | None = now if up else now - datetime.timedelta(hours=1)
        if marked_down:
            seen = None
        ctxt = await self._ctxt()
        async with self.database.request(ctxt):
            await ctxt.db.insert(
                "services",
                {
                    "host": name,
                    "binary": BINARY_COMPUTE,
                    "topic": "compute",
                    "version": 1,
                    "last_seen_up": seen,
                    "created_at": now,
                    "deleted": False,
                    "disabled": False,
                    "forced_down": False,
                    "report_count": 1,
                },
            )
            await ctxt.db.insert(
                "compute_nodes",
                {
                    "uuid": str(uuidlib.uuid4()),
                    "host": name,
                    "hypervisor_hostname": name,
                    "hypervisor_type": "fake",
                    "vcpus": 64,
                    "memory_mb": 65536,
                    "local_gb": 100,
                    "vcpus_used": 0,
                    "memory_mb_used": 0,
                    "local_gb_used": 0,
                    "running_vms": 0,
                    "cpu_allocation_ratio": 1.0,
                    "ram_allocation_ratio": 1.0,
                    "disk_allocation_ratio": 1.0,
                    "created_at": now,
                    "updated_at": now,
                    "deleted": False,
                },
            )

    async def set_service(self, host: str, **values: Any) -> None:
        ctxt = await self._ctxt()
        async with self.database.request(ctxt):
            await ctxt.db.update("services", {"host": host}, values, returning=())

    async def instance(
        self,
        *,
        host: str | None,
        task_state: str | None,
        vm_state: str = "building",
        age: float = 0.0,
        attempts: tuple[str, ...] = (),
        memory_mb: int = 512,
    ) -> str:
        """An instance with its ``create`` action (and a build event per host in
        ``attempts``), last changed ``age`` seconds ago."""
        uuid = str(uuidlib.uuid4())
        stamp = utcnow() - datetime.timedelta(seconds=age)
        ctxt = await self._ctxt()
        async with self.database.request(ctxt):
            await ctxt.db.insert(
                "instances",
                {
                    "uuid": uuid,
                    "name": "vm",
                    "user_id": "admin",
                    "project_id": "p1",
                    "host": host,
                    "vm_state": vm_state,
                    "task_state": task_state,
                    "vcpus": 1,
                    "memory_mb": memory_mb,
                    "root_gb": 1,
                    "image_ref": "fake-image",
                    "created_at": stamp,
                    "updated_at": stamp,
                    "deleted": False,
                },
            )
            action = await InstanceAction.action_start(ctxt, uuid, "create")
            for attempt_host in attempts:
                await ctxt.db.insert(
                    "instance_action_events",
                    {
                        "action_id": action.id,
                        "event": "compute_run_instance",
                        "start_time": stamp,
                        "host": attempt_host,
                        "created_at": stamp,
                        "deleted": False,
                    },
                )
            await ctxt.db.update(
                "instance_actions", {"id": action.id}, {"start_time": stamp}, returning=()
            )
        return uuid

    async def age(self, table: str, where: dict[str, Any], seconds: float) -> None:
        """Make a row look unchanged for ``seconds``."""
        stamp = utcnow() - datetime.timedelta(seconds=seconds)
        ctxt = await self._ctxt()
        async with self.database.request(ctxt):
            await ctxt.db.update(table, where, {"updated_at": stamp}, returning=())

    async def rows(self, table: str, where: dict[str, Any]) -> list[dict[str, Any]]:
        ctxt = await self._ctxt()
        async with self.database.request(ctxt):
            found: list[dict[str, Any]] = await ctxt.db.select(table, where)
        return found

    async def row(self, table: str, where: dict[str, Any]) -> dict[str, Any]:
        (found,) = await self.rows(table, where)
        return found


#: Bounds short enough for tests that age rows by a few dozen seconds.
TEST_BOUNDS = Bounds(
    service_down_time=60.0,
    build_recast_after=30.0,
    build_reschedule_after=60.0,
    unassigned_build_after=30.0,
    build_host_down_after=30.0,
    delete_recast_after=30.0,
    delete_host_down_after=30.0,
    migration_hosts_down_after=30.0,
    action_settle_after=30.0,
)


@contextlib.asynccontextmanager
async def reconcile_world(url: str, *, migrate: bool = True) -> AsyncIterator[World]:
    """A ``World`` on the database at ``url`` (migrated to head first)."""
    if migrate:
        await migration.upgrade(url)
    database = Database(url)
    compute = FakeCompute()
    settings = BuildSettings(max_attempts=3, service_down_time=TEST_BOUNDS.service_down_time)
    build = BuildTask(database, compute, settings)  # type: ignore[arg-type]
    try:
        yield World(database, compute, build, TEST_BOUNDS)
    finally:
        await database.dispose()
