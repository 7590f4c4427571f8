"""``fleetctl services|hosts|flavor|volume``: the fleet's services, hosts, flavors and volumes."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from conductor.cli._output import emit, object_dict
from conductor.cli._session import check_uuid, session
from shared_objects.config import FleetConfig
from shared_objects.objects.compute_node import ComputeNodeList
from shared_objects.objects.flavor import Flavor, FlavorList
from shared_objects.objects.service import ServiceList

SERVICE_COLUMNS = ("host", "binary", "version", "state", "disabled", "last_seen_up")
HOST_COLUMNS = (
    "host",
    "vcpus",
    "vcpus_used",
    "memory_mb",
    "memory_mb_used",
    "local_gb",
    "local_gb_used",
    "running_vms",
)
FLAVOR_COLUMNS = ("flavorid", "name", "vcpus", "memory_mb", "root_gb")


async def services(args: argparse.Namespace, cfg: FleetConfig) -> int:
    now = datetime.datetime.now(datetime.UTC)
    async with session(cfg) as s:
        found = await ServiceList.get_all(s.ctxt)
    rows = []
    for svc in found:
        row = object_dict(svc, ("host", "binary", "version", "disabled", "last_seen_up"))
        row["state"] = "up" if svc.is_up_at(now, cfg.service.service_down_time) else "down"
        rows.append(row)
    rows.sort(key=lambda r: (r["binary"], r["host"]))
    emit(args.format, rows, SERVICE_COLUMNS)
    return 0


async def hosts(args: argparse.Namespace, cfg: FleetConfig) -> int:
    async with session(cfg) as s:
        nodes = await ComputeNodeList.get_all(s.ctxt)
    rows = sorted((object_dict(n, HOST_COLUMNS) for n in nodes), key=lambda r: r["host"])
    emit(args.format, rows, HOST_COLUMNS)
    return 0


async def flavor_create(args: argparse.Namespace, cfg: FleetConfig) -> int:
    async with session(cfg) as s:
        flavor = Flavor(
            s.ctxt,
            name=args.name,
            flavorid=args.id or args.name,
            vcpus=args.vcpus,
            memory_mb=args.ram,
            root_gb=args.disk,
        )
        await flavor.create()
    emit(args.format, object_dict(flavor, FLAVOR_COLUMNS), FLAVOR_COLUMNS)
    return 0


async def flavor_list(args: argparse.Namespace, cfg: FleetConfig) -> int:
    async with session(cfg) as s:
        found = await FlavorList.get_all(s.ctxt)
    rows = sorted((object_dict(f, FLAVOR_COLUMNS) for f in found), key=lambda r: r["name"])
    emit(args.format, rows, FLAVOR_COLUMNS)
    return 0


async def volume_attach(args: argparse.Namespace, cfg: FleetConfig) -> int:
    uuid = check_uuid(args.uuid)
    async with session(cfg) as s:
        result = await s.tasks.attach_volume(
            s.ctxt, instance_uuid=uuid, volume_id=args.volume_id, device_name=args.device
        )
    emit(args.format, result, ())
    return 0


async def volume_detach(args: argparse.Namespace, cfg: FleetConfig) -> int:
    uuid = check_uuid(args.uuid)
    async with session(cfg) as s:
        await s.tasks.detach_volume(s.ctxt, instance_uuid=uuid, volume_id=args.volume_id)
    emit(args.format, {"instance_uuid": uuid, "volume_id": args.volume_id, "detached": True}, ())
    return 0


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def register_commands(commands: Any) -> None:
    commands.add_parser("services", help="list services and their state").set_defaults(
        func=services
    )
    commands.add_parser("hosts", help="compute hosts: capacity and usage").set_defaults(func=hosts)

    flavor = commands.add_parser("flavor", help="flavors").add_subparsers(
        dest="flavor_command", metavar="COMMAND", required=True
    )
    p = flavor.add_parser("create", help="create a flavor")
    p.add_argument("name")
    p.add_argument("--id", help="flavor id (default: the name)")
    p.add_argument("--vcpus", type=_non_negative, required=True)
    p.add_argument("--ram", type=_non_negative, required=True, help="MB")
    p.add_argument("--disk", type=_non_negative, required=True, help="GB")
    p.set_defaults(func=flavor_create)
    flavor.add_parser("list", help="list flavors").set_defaults(func=flavor_list)

    volume = commands.add_parser("volume", help="volumes").add_subparsers(
        dest="volume_command", metavar="COMMAND", required=True
    )
    for name, func in (("attach", volume_attach), ("detach", volume_detach)):
        p = volume.add_parser(name, help=f"{name} a volume")
        p.add_argument("uuid", help="instance uuid")
        p.add_argument("volume_id")
        if name == "attach":
            p.add_argument("--device", help="e.g. /dev/vdb")
        p.set_defaults(func=func)
