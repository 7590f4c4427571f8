"""``fleetctl boot|list|show|delete|lock|unlock``: instances, named by UUID or by name."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, Any

from conductor.tools.fleetctl._base import CommandError, is_uuid, name, positive_int, seconds
from conductor.tools.fleetctl._output import emit, message, object_dict

if TYPE_CHECKING:
    from conductor.tools.fleetctl._session import Session
    from shared_objects.objects.instance import Instance
    from shared_objects.runtime.config import FleetConfig

LIST_COLUMNS = ("uuid", "name", "host", "vm_state", "task_state", "power_state")
SHOW_FIELDS = (
    "uuid",
    "name",
    "host",
    "node",
    "vm_state",
    "task_state",
    "power_state",
    "vcpus",
    "memory_mb",
    "root_gb",
    "image_ref",
    "progress",
    "locked",
    "locked_reason",
    "launched_at",
    "created_at",
    "updated_at",
)
FINAL_VM_STATES = frozenset({"active", "error", "stopped"})


async def find_instance(s: Session, ref: str) -> Instance:
    """The instance whose UUID or name is ``ref``; an error listing them if several match."""
    from shared_objects import exception
    from shared_objects.objects.instance import Instance, InstanceList

    if is_uuid(ref):
        try:
            return await Instance.get_by_uuid(s.ctxt, ref)
        except exception.InstanceNotFound:
            raise CommandError(f"no instance {ref}") from None
    matches = [i for i in await InstanceList.get_all(s.ctxt) if i.name == ref]
    if not matches:
        raise CommandError(f"no instance named {ref!r}")
    if len(matches) > 1:
        listed = ", ".join(f"{i.uuid} (on {i.host or 'no host'})" for i in matches)
        raise CommandError(
            f"{len(matches)} instances are named {ref!r}: {listed} — name one by its UUID"
        )
    return matches[0]


async def latest_fault(s: Session, uuid: str) -> Any:
    """The instance's most recent fault, or None."""
    from shared_objects import exception
    from shared_objects.objects.instance_fault import InstanceFault

    try:
        return await InstanceFault.get_latest_for_instance(s.ctxt, uuid)
    except exception.InstanceFaultNotFound:
        return None


async def wait_settled(
    s: Session, uuids: list[str], timeout: float, *, deleted: bool = False
) -> list[Instance]:
    """Poll until every instance reached a final state (or is gone, when deleting)."""
    from shared_objects.objects.instance import InstanceList

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = list(await InstanceList.get_by_uuids(s.ctxt, uuids))
        if deleted:
            if all(i.deleted for i in found):
                return found
        elif all(i.vm_state in FINAL_VM_STATES and i.task_state is None for i in found):
            return found
        if loop.time() > deadline:
            raise CommandError(f"timed out after {timeout:g}s waiting for {len(uuids)} instance(s)")
        await asyncio.sleep(0.25)


async def boot(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session

    async with session(args, cfg) as s:
        made = await s.tasks.build_instances(
            s.ctxt,
            flavor=args.flavor,
            name=args.name,
            image_ref=args.image,
            count=args.count,
            security_groups=args.security_group or None,
            block_device_mappings=[{"volume_id": v} for v in args.volume] or None,
            forced_host=args.host,
        )
        uuids = [m["uuid"] for m in made]
        rows: list[dict[str, Any]]
        failed: list[str] = []
        if args.wait:
            insts = await wait_settled(s, uuids, args.wait_timeout)
            rows = [object_dict(i, LIST_COLUMNS) for i in insts]
            for inst in insts:
                if inst.vm_state == "error":
                    fault = await latest_fault(s, inst.uuid)
                    reason = fault.message if fault is not None else "no fault recorded"
                    failed.append(f"instance {inst.name} ({inst.uuid}) ended in ERROR: {reason}")
        else:
            rows = list(made)
    emit(args, rows, LIST_COLUMNS if args.wait else ("uuid", "name"))
    for line in failed:
        print(f"fleetctl: {line}", file=sys.stderr)
    return 1 if failed else 0


async def list_(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session
    from shared_objects.objects.instance import InstanceList

    async with session(args, cfg) as s:
        if args.host:
            insts = await InstanceList.get_by_host(s.ctxt, args.host)
        else:
            insts = await InstanceList.get_all(s.ctxt)
    rows = sorted((object_dict(i, LIST_COLUMNS) for i in insts), key=lambda r: str(r["name"]))
    emit(args, rows, LIST_COLUMNS)
    return 0


async def show(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session

    async with session(args, cfg) as s:
        inst = await find_instance(s, args.instance)
        record = object_dict(inst, SHOW_FIELDS)
        if inst.vm_state == "error":
            fault = await latest_fault(s, inst.uuid)
            record["fault"] = fault.message if fault is not None else None
    emit(args, record)
    return 0


async def delete(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session

    async with session(args, cfg) as s:
        uuid = (await find_instance(s, args.instance)).uuid
        await s.tasks.delete_instance(s.ctxt, instance_uuid=uuid)
        if args.wait:
            await wait_settled(s, [uuid], args.wait_timeout, deleted=True)
    done = "deleted" if args.wait else "deletion requested"
    message(args, f"instance {uuid} {done}", {"uuid": uuid, "deleted": bool(args.wait)})
    return 0


async def lock(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session

    async with session(args, cfg) as s:
        uuid = (await find_instance(s, args.instance)).uuid
        await s.tasks.lock_instance(s.ctxt, instance_uuid=uuid, reason=args.reason)
    message(args, f"instance {uuid} locked", {"uuid": uuid, "locked": True})
    return 0


async def unlock(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session

    async with session(args, cfg) as s:
        uuid = (await find_instance(s, args.instance)).uuid
        await s.tasks.unlock_instance(s.ctxt, instance_uuid=uuid)
    message(args, f"instance {uuid} unlocked", {"uuid": uuid, "locked": False})
    return 0


INSTANCE_HELP = "instance UUID or name"


def register_commands(commands: Any) -> None:
    p = commands.add_parser("boot", help="boot instances")
    p.add_argument("--flavor", required=True, type=name, help="flavor name or id")
    p.add_argument("--name", required=True, type=name)
    p.add_argument("--count", type=positive_int, default=1)
    p.add_argument("--host", type=name, help="force this compute host")
    p.add_argument("--image", type=name, default="fake-image", help="image reference")
    p.add_argument("--security-group", action="append", default=[], metavar="NAME", type=name)
    p.add_argument("--volume", action="append", default=[], metavar="VOLUME_ID", type=name)
    p.add_argument("--wait", action="store_true", help="wait for ACTIVE or ERROR (exit 1 on ERROR)")
    p.add_argument("--wait-timeout", type=seconds, default=300.0, metavar="SECONDS")
    p.set_defaults(func=boot)

    p = commands.add_parser("list", help="list instances")
    p.add_argument("--host", type=name)
    p.set_defaults(func=list_)

    p = commands.add_parser("show", help="show one instance (and its fault, if in ERROR)")
    p.add_argument("instance", type=name, help=INSTANCE_HELP)
    p.set_defaults(func=show)

    p = commands.add_parser("lock", help="protect an instance from delete and live migration")
    p.add_argument("instance", type=name, help=INSTANCE_HELP)
    p.add_argument("--reason", required=True, type=name)
    p.set_defaults(func=lock)

    p = commands.add_parser("unlock", help="remove an instance's lock")
    p.add_argument("instance", type=name, help=INSTANCE_HELP)
    p.set_defaults(func=unlock)

    p = commands.add_parser("delete", help="delete an instance")
    p.add_argument("instance", type=name, help=INSTANCE_HELP)
    p.add_argument("--wait", action="store_true")
    p.add_argument("--wait-timeout", type=seconds, default=120.0, metavar="SECONDS")
    p.set_defaults(func=delete)
