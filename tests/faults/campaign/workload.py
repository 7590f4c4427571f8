"""The mixed workload run while a fault is injected: a boot storm, deletes, live migrations and
volume attach/detach, spread over a few seconds so that some of it straddles the fault.

Each operation is recorded (``OpRecord``) with what the API said; once the fleet has had its
recovery window, ``classify`` reads the database and decides, per operation, whether it
succeeded, failed cleanly (the API returned an error, or the instance ended in ERROR with a
fault recorded), or did not end (stuck) or ended wrongly (lost: the API said yes, nothing
happened).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
from typing import Any

from sqlalchemy import text

from campaign.env import Phase, honour_cancellation
from shared_objects.context import RequestContext
from shared_objects.rpc_clients.compute_task import ComputeTaskAPI

#: What an operation may end as (``classify``).
SUCCEEDED, FAILED_CLEAN, STUCK, LOST = "succeeded", "failed_clean", "stuck", "lost"
FINAL_VM_STATES = frozenset({"active", "stopped", "error"})
FINAL_MIGRATION = frozenset({"completed", "failed", "error", "cancelled"})
# Each API call is bounded: a call that never returns is itself a finding, not a hang.
CALL_TIMEOUT = 30.0
CALL_GUARD = CALL_TIMEOUT + 15.0


@dataclasses.dataclass(frozen=True)
class Load:
    """How much work one fault sees."""

    base: int  # instances booted and settled before the fault (targets of the other ops)
    storm: int  # instances booted during the fault
    storm_calls: int  # ... in this many build requests
    deletes: int
    migrations: int
    volumes: int  # attach + detach pairs
    spread: float = 4.0  # seconds over which the operations are issued

    def __post_init__(self) -> None:
        if self.deletes + self.migrations + self.volumes > self.base:
            raise ValueError("deletes + migrations + volumes need that many base instances")

    def describe(self) -> str:
        return (
            f"boot {self.storm}, del {self.deletes}, mig {self.migrations}, "
            f"vol {self.volumes} (on {self.base})"
        )


@dataclasses.dataclass
class OpRecord:
    kind: str  # boot | delete | live_migrate | attach | detach
    target: str | None  # the instance (None: a boot's instances are in ``instances``)
    started: float
    elapsed: float | None = None
    api_error: str | None = None
    instances: list[str] = dataclasses.field(default_factory=list)
    migration: str | None = None
    requested: int = 1  # instances a boot asked for
    outcome: str | None = None
    detail: str = ""

    @property
    def weight(self) -> int:
        """Operations this record stands for (a boot of N instances is N operations)."""
        return max(self.requested, len(self.instances)) if self.kind == "boot" else 1


def operator_context() -> RequestContext:
    """A fresh request per operation: actions are keyed by request id."""
    return RequestContext(user_id="operator", project_id="admin", is_admin=True)


class Workload:
    """One fault's operations against one cluster."""

    def __init__(self, phase: Phase, load: Load, *, seed: int = 0) -> None:
        self.phase = phase
        self.load = load
        self.records: list[OpRecord] = []
        self.base: list[str] = []
        self._random = random.Random(seed)
        assert phase.cluster.transport is not None
        self.api = ComputeTaskAPI(phase.cluster.transport, timeout=CALL_TIMEOUT)
        self._loop = asyncio.get_running_loop()

    async def prepare(self, within: float = 60.0) -> None:
        """Boot the base instances and wait until they are active (before any fault)."""
        if self.load.base == 0:
            return
        self.base = [
            m["uuid"]
            for m in await self.api.build_instances(
                operator_context(), flavor="small", name="base", count=self.load.base
            )
        ]
        await self.phase.cluster.wait_instances(self.base, timeout=within)

    async def run(self) -> None:
        """Issue every operation (spread over ``load.spread`` seconds) and wait for each API
        call to return; what the calls started may still be running afterwards."""
        load = self.load
        targets = list(self.base)
        self._random.shuffle(targets)
        deletes = targets[: load.deletes]
        migrations = targets[load.deletes : load.deletes + load.migrations]
        volumes = targets[load.deletes + load.migrations :][: load.volumes]
        sizes = _split(load.storm, load.storm_calls)
        plan: list[tuple[str, Any]] = [("boot", n) for n in sizes]
        # Migrations first: the mid-migration faults need one running early.
        plan = [("live_migrate", u) for u in migrations] + plan
        plan += [("delete", u) for u in deletes] + [("volume", u) for u in volumes]
        steps = max(1, len(plan) - 1)
        tasks = []
        for index, (kind, arg) in enumerate(plan):
            delay = load.spread * index / steps if len(plan) > 1 else 0.0
            tasks.append(asyncio.create_task(self._later(delay, kind, arg)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _later(self, delay: float, kind: str, arg: Any) -> None:
        await asyncio.sleep(delay)
        if kind == "boot":
            record = OpRecord("boot", None, self._loop.time(), requested=arg)
            await self._call(record, self._boot(record, arg))
        elif kind == "delete":
            record = OpRecord("delete", arg, self._loop.time())
            await self._call(
                record, self.api.delete_instance(operator_context(), instance_uuid=arg)
            )
        elif kind == "live_migrate":
            record = OpRecord("live_migrate", arg, self._loop.time())
            await self._call(record, self._migrate(record, arg))
        elif kind == "volume":
            attach = OpRecord("attach", arg, self._loop.time())
            volume = f"vol-{arg[:8]}"
            ok = await self._call(
                attach,
                self.api.attach_volume(operator_context(), instance_uuid=arg, volume_id=volume),
            )
            if ok:
                detach = OpRecord("detach", arg, self._loop.time())
                await self._call(
                    detach,
                    self.api.detach_volume(operator_context(), instance_uuid=arg, volume_id=volume),
                )

    async def _boot(self, record: OpRecord, count: int) -> None:
        made = await self.api.build_instances(
            operator_context(), flavor="small", name="storm", count=count
        )
        record.instances = [m["uuid"] for m in made]

    async def _migrate(self, record: OpRecord, uuid: str) -> None:
        record.migration = await self.api.live_migrate_instance(
            operator_context(), instance_uuid=uuid
        )

    async def _call(self, record: OpRecord, call: Any) -> bool:
        """Run one API call, bounded; record how it ended. True: it returned."""
        self.records.append(record)
        try:
            await asyncio.wait_for(call, CALL_GUARD)
        except TimeoutError:
            record.api_error = f"no answer within {CALL_GUARD:.0f} s (call hung)"
            return False
        except Exception as exc:  # every API failure is an outcome to record, not a crash
            honour_cancellation()
            # The first line says what happened (a RemoteError goes on with the remote traceback).
            first = next(iter(str(exc).splitlines()), "")
            record.api_error = f"{type(exc).__name__}: {first[:160]}"
            return False
        finally:
            record.elapsed = self._loop.time() - record.started
        return True

    def boots_requested(self) -> int:
        return sum(len(r.instances) for r in self.records if r.kind == "boot")

    async def classify(self) -> dict[str, int]:
        """Decide each operation's outcome from the database; counts per outcome (weighted)."""
        state = await read_state(self.phase)
        for record in self.records:
            record.outcome, record.detail = _outcome(record, state)
        counts: dict[str, int] = collections.Counter()
        for record in self.records:
            counts[record.outcome or STUCK] += record.weight
        counts["attempted"] = sum(r.weight for r in self.records)
        return dict(counts)


@dataclasses.dataclass
class DbState:
    instances: dict[str, dict[str, Any]]
    faults: set[str]
    migrations: dict[str, dict[str, Any]]


async def read_state(phase: Phase) -> DbState:
    """Instances (deleted ones too), instances with a fault, migrations: straight from the
    database, never through a conductor (one may be dead or starved)."""
    async with phase.database.engine.connect() as conn:
        instances = {
            row["uuid"]: dict(row)
            for row in (
                await conn.execute(
                    text("SELECT uuid, vm_state, task_state, host, deleted FROM instances")
                )
            ).mappings()
        }
        faults = {
            row[0]
            for row in await conn.execute(
                text("SELECT DISTINCT instance_uuid FROM instance_faults")
            )
        }
        migrations = {
            row["uuid"]: dict(row)
            for row in (
                await conn.execute(
                    text(
                        "SELECT uuid, instance_uuid, status, source_compute, dest_compute "
                        "FROM migrations"
                    )
                )
            ).mappings()
        }
    return DbState(instances, faults, migrations)


def is_transitional(row: dict[str, Any]) -> bool:
    """Not deleted and not at rest: the definition of a stuck instance after recovery."""
    if row["deleted"]:
        return False
    return row["vm_state"] not in FINAL_VM_STATES or row["task_state"] is not None


def _instance_outcome(uuid: str, state: DbState) -> tuple[str, str]:
    row = state.instances.get(uuid)
    if row is None:
        return LOST, "no such instance in the database"
    where = f"{row['vm_state']}/{row['task_state']} on {row['host']}"
    if is_transitional(row):
        return STUCK, where
    if row["vm_state"] == "error":
        if uuid in state.faults:
            return FAILED_CLEAN, where
        return LOST, f"{where} without a fault"
    return SUCCEEDED, where


def _outcome(record: OpRecord, state: DbState) -> tuple[str, str]:
    if record.kind == "boot":
        if record.api_error and not record.instances:
            return FAILED_CLEAN, record.api_error
        outcomes = collections.Counter(_instance_outcome(u, state)[0] for u in record.instances)
        # A boot of N instances is N operations; the record carries the worst outcome.
        for worst in (STUCK, LOST, FAILED_CLEAN):
            if outcomes[worst]:
                return worst, dict(outcomes).__repr__()
        return SUCCEEDED, dict(outcomes).__repr__()
    row = state.instances.get(record.target or "")
    if row is not None and is_transitional(row):
        return STUCK, f"instance {row['vm_state']}/{row['task_state']} on {row['host']}"
    if record.kind == "delete":
        if row is not None and row["deleted"]:
            return SUCCEEDED, "deleted"
        if record.api_error:
            return FAILED_CLEAN, record.api_error
        return LOST, "delete accepted, instance still there"
    if record.kind == "live_migrate":
        if record.api_error:
            return FAILED_CLEAN, record.api_error
        migration = state.migrations.get(record.migration or "")
        if migration is None:
            return LOST, f"migration {record.migration} not in the database"
        status = migration["status"]
        if status not in FINAL_MIGRATION:
            return STUCK, f"migration {status}"
        return (SUCCEEDED if status == "completed" else FAILED_CLEAN), f"migration {status}"
    # attach / detach: the volume invariant (BDMs == hypervisor) judges what they left.
    if record.api_error:
        return FAILED_CLEAN, record.api_error
    return SUCCEEDED, "returned"


def _split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total)) if total else 0
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
