"""The check run after each fault: is the fleet whole again?

Reuses ``compute_agent.testing_invariants.check_fleet_invariants`` (placement on exactly one
hypervisor, no leftover or duplicate guest, usage equal to the sum of instances on every host, no
``task_state`` left) and adds what a fault campaign also needs:

- every instance at rest: ``active``/``stopped``/``error`` (or deleted); an ``error`` one has a
  fault recorded (that is what "failed cleanly" means);
- no instance action or action event left open (``finish_time`` unset);
- no migration left in a non-final status;
- each instance's volumes on its hypervisor are exactly its block device mappings;
- no message left unacknowledged on any queue, and none waiting on an RPC queue.

Everything is read from the database (the checker's own pool, as the conductor would, never
through a conductor: one may be dead or starved), the hypervisors' state files and
``rabbitmqctl list_queues`` on the private node.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from sqlalchemy import text

from campaign.env import Phase
from campaign.workload import DbState, is_transitional, read_state
from compute_agent.testing_invariants import check_fleet_invariants
from compute_agent.virt.state_view import hypervisor_view
from shared_objects.context import RequestContext

CHECK_TIMEOUT = 30.0


@dataclasses.dataclass
class CheckResult:
    violations: list[str]
    #: Instances not at rest: ``{uuid: "vm_state/task_state on host"}``.
    stuck: dict[str, str]

    @property
    def ok(self) -> bool:
        return not self.violations


async def check(phase: Phase) -> CheckResult:
    """Every broken invariant, bounded in time (a hung read is a violation, not a hang)."""
    try:
        return await asyncio.wait_for(_check(phase), CHECK_TIMEOUT)
    except TimeoutError:
        return CheckResult([f"invariant check did not finish within {CHECK_TIMEOUT:.0f} s"], {})
    except Exception as exc:  # the database or broker may still be recovering
        return CheckResult([f"invariant check failed: {type(exc).__name__}: {exc}"[:300]], {})


async def _check(phase: Phase) -> CheckResult:
    state = await read_state(phase)
    view = await hypervisor_view(phase.hypervisors)
    ctxt = RequestContext(user_id="campaign", project_id="admin", is_admin=True)
    async with phase.database.request(ctxt):
        problems = await check_fleet_invariants(ctxt, view)
    stuck = {
        uuid: f"{row['vm_state']}/{row['task_state']} on {row['host']}"
        for uuid, row in state.instances.items()
        if is_transitional(row)
    }
    problems += [f"instance {uuid}: not at rest ({where})" for uuid, where in stuck.items()]
    problems += _errors_without_fault(state)
    problems += await _open_records(phase)
    problems += await _volumes(phase, view)
    problems += await _queues(phase)
    return CheckResult(problems, stuck)


def _errors_without_fault(state: DbState) -> list[str]:
    return [
        f"instance {uuid}: ERROR without a fault recorded"
        for uuid, row in state.instances.items()
        if not row["deleted"] and row["vm_state"] == "error" and uuid not in state.faults
    ]


async def _open_records(phase: Phase) -> list[str]:
    async with phase.database.engine.connect() as conn:
        actions = (
            await conn.execute(
                text(
                    "SELECT instance_uuid, action, request_id FROM instance_actions "
                    "WHERE finish_time IS NULL"
                )
            )
        ).all()
        events = (
            await conn.execute(
                text(
                    "SELECT a.instance_uuid, e.event FROM instance_action_events e "
                    "JOIN instance_actions a ON a.id = e.action_id WHERE e.finish_time IS NULL"
                )
            )
        ).all()
        migrations = (
            await conn.execute(
                text(
                    "SELECT uuid, instance_uuid, status FROM migrations WHERE status NOT IN "
                    "('completed', 'failed', 'error', 'cancelled')"
                )
            )
        ).all()
    out = [f"instance {u}: action {a!r} ({r}) left open" for u, a, r in actions]
    out += [f"instance {u}: action event {e!r} left open" for u, e in events]
    out += [f"migration {m} of {u}: left in status {s!r}" for m, u, s in migrations]
    return out


async def _volumes(phase: Phase, view: Any) -> list[str]:
    async with phase.database.engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT b.instance_uuid, b.volume_id, i.host FROM block_device_mappings b "
                    "JOIN instances i ON i.uuid = b.instance_uuid "
                    "WHERE b.deleted = false AND i.deleted = false AND b.volume_id IS NOT NULL"
                )
            )
        ).all()
        hosts = {
            u: h
            for u, h in (
                await conn.execute(text("SELECT uuid, host FROM instances WHERE deleted = false"))
            ).all()
        }
    mapped: dict[str, set[str]] = {}
    for uuid, volume, _host in rows:
        mapped.setdefault(uuid, set()).add(volume)
    out = []
    for uuid, host in hosts.items():
        info = view.get(host or "", {}).get(uuid)
        attached = set(info.volumes) if info is not None else set()
        want = mapped.get(uuid, set())
        if attached != want:
            out.append(
                f"instance {uuid}: volumes on {host} {sorted(attached)} != mappings {sorted(want)}"
            )
    return out


async def _queues(phase: Phase) -> list[str]:
    listing = await phase.node.ctl(
        "list_queues",
        "-p",
        phase.vhost,
        "-q",
        "--no-table-headers",
        "name",
        "messages_ready",
        "messages_unacknowledged",
        "consumers",
        within=20,
    )
    out = []
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) != 4 or not parts[1].isdigit():
            continue
        name, ready, unacked, consumers = parts[0], int(parts[1]), int(parts[2]), parts[3]
        if unacked:
            out.append(f"queue {name}: {unacked} message(s) unacknowledged")
        # Nobody reads notifications here, and a dead caller's replies are harmless.
        if ready and "notifications" not in name and not name.startswith("reply_"):
            out.append(f"queue {name}: {ready} message(s) waiting ({consumers} consumers)")
    return out
