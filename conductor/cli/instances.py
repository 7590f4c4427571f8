"""``fleetctl boot|list|show|delete``: instances."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from conductor.cli._output import emit, object_dict
from conductor.cli._session import CommandError, Session, check_uuid, session
from shared_objects import exception
from shared_objects.config import FleetConfig
from shared_objects.objects.instance import Instance, InstanceList
from shared_objects.objects.instance_fault import InstanceFault

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


async def _get(s: Session, uuid: str) -> Instance:
    try:
        return await Instance.get_by_uuid(s.ctxt, uuid)
    except exception.InstanceNotFound:
        raise CommandError(f"no instance {uuid}") from None


async def wait_settled(
    s: Session, uuids: list[str], timeout: float, *, deleted: bool = False
) -> list[Instance]:
    """Poll until every instance reached a final state (or is gone, when deleting)."""
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
    if args.count < 1:
        raise CommandError(f"--count must be at least 1, got {args.count}")
    async with session(cfg) as s:
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
        if args.wait:
            insts = await wait_settled(s, uuids, args.timeout)
            rows = [object_dict(i, LIST_COLUMNS) for i in insts]
        else:
            rows = list(made)
    emit(args.format, rows, LIST_COLUMNS if args.wait else ("uuid", "name"))
    if args.wait and any(r["vm_state"] == "error" for r in rows):
        return 1
    return 0


async def list_(args: argparse.Namespace, cfg: FleetConfig) -> int:
    async with session(cfg) as s:
        if args.host:
            insts = await InstanceList.get_by_host(s.ctxt, args.host)
        else:
            insts = await InstanceList.get_all(s.ctxt)
    rows = sorted((object_dict(i, LIST_COLUMNS) for i in insts), key=lambda r: str(r["name"]))
    emit(args.format, rows, LIST_COLUMNS)
    return 0


async def show(args: argparse.Namespace, cfg: FleetConfig) -> int:
    uuid = check_uuid(args.uuid)
    async with session(cfg) as s:
        inst = await _get(s, uuid)
        record = object_dict(inst, SHOW_FIELDS)
        if inst.vm_state == "error":
            try:
                fault = await InstanceFault.get_latest_for_instance(s.ctxt, uuid)
                record["fault"] = fault.message
            except exception.InstanceFaultNotFound:
                record["fault"] = None
    emit(args.format, record, SHOW_FIELDS)
    return 0


async def delete(args: argparse.Namespace, cfg: FleetConfig) -> int:
    uuid = check_uuid(args.uuid)
    async with session(cfg) as s:
        await _get(s, uuid)
        await s.tasks.delete_instance(s.ctxt, instance_uuid=uuid)
        if args.wait:
            await wait_settled(s, [uuid], args.timeout, deleted=True)
    if args.format == "json":
        emit(args.format, {"uuid": uuid, "deleted": bool(args.wait)}, ())
    else:
        print(f"instance {uuid} {'deleted' if args.wait else 'deletion requested'}")
    return 0


async def lock(args: argparse.Namespace, cfg: FleetConfig) -> int:
    uuid = check_uuid(args.uuid)
    async with session(cfg) as s:
        await s.tasks.lock_instance(s.ctxt, instance_uuid=uuid, reason=args.reason)
    print(f"instance {uuid} locked")
    return 0


async def unlock(args: argparse.Namespace, cfg: FleetConfig) -> int:
    uuid = check_uuid(args.uuid)
    async with session(cfg) as s:
        await s.tasks.unlock_instance(s.ctxt, instance_uuid=uuid)
    print(f"instance {uuid} unlocked")
    return 0


def register_commands(commands: Any) -> None:
    p = commands.add_parser("boot", help="boot instances")
    p.add_argument("--flavor", required=True, help="flavor name or id")
    p.add_argument("--name", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--host", help="force this compute host")
    p.add_argument("--image", default="fake-image", help="image reference")
    p.add_argument("--security-group", action="append", default=[], metavar="NAME")
    p.add_argument("--volume", action="append", default=[], metavar="VOLUME_ID")
    p.add_argument("--wait", action="store_true", help="wait for ACTIVE or ERROR")
    p.add_argument("--timeout", type=float, default=300.0)
    p.set_defaults(func=boot)

    p = commands.add_parser("list", help="list instances")
    p.add_argument("--host")
    p.set_defaults(func=list_)

    p = commands.add_parser("show", help="show one instance")
    p.add_argument("uuid")
    p.set_defaults(func=show)

    p = commands.add_parser("lock", help="protect an instance from delete and live migration")
    p.add_argument("uuid")
    p.add_argument("--reason", required=True)
    p.set_defaults(func=lock)

    p = commands.add_parser("unlock", help="remove an instance's lock")
    p.add_argument("uuid")
    p.set_defaults(func=unlock)

    p = commands.add_parser("delete", help="delete an instance")
    p.add_argument("uuid")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(func=delete)
