"""``fleetctl service|services|hosts|flavor|volume``: the fleet's services, hosts, flavors and
volumes.

``service disable HOST`` sets the ``disabled`` flag of the host's compute service (with a
reason): the scheduler places nothing new there (``conductor/scheduler.py`` filters disabled
hosts; each conductor's host view sees the change within its refresh interval), instances
already on it keep running. ``service delete`` removes the row of a service that is down
(a running one would register again at its next start).
"""

from __future__ import annotations

import argparse
import datetime
from typing import TYPE_CHECKING, Any

from conductor.tools.fleetctl._base import CommandError, name, non_negative_int, positive_int
from conductor.tools.fleetctl._output import emit, message, object_dict

if TYPE_CHECKING:
    from conductor.tools.fleetctl._session import Session
    from shared_objects.objects.flavor import Flavor
    from shared_objects.objects.service import Service
    from shared_objects.runtime.config import FleetConfig

SERVICE_COLUMNS = (
    "id",
    "host",
    "binary",
    "version",
    "release",
    "state",
    "disabled",
    "disabled_reason",
    "last_seen_up",
)
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
COMPUTE_BINARY = "fleet-compute"


def _is_up(svc: Service, cfg: FleetConfig) -> bool:
    return svc.is_up_at(datetime.datetime.now(datetime.UTC), cfg.service.service_down_time)


async def services(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session
    from shared_objects import releases
    from shared_objects.objects.service import ServiceList

    async with session(args, cfg) as s:
        found = await ServiceList.get_all(s.ctxt)
    rows = []
    for svc in found:
        row = object_dict(svc, [c for c in SERVICE_COLUMNS if c not in ("state", "release")])
        # The stored number is what services compare; people know releases by name (the
        # major.minor of --version and of /metrics' version label).
        row["release"] = releases.name_of_service_version(svc.version)
        row["state"] = "up" if _is_up(svc, cfg) else "down"
        rows.append(row)
    rows.sort(key=lambda r: (r["binary"], r["host"]))
    emit(args, rows, SERVICE_COLUMNS)
    return 0


async def _find_service(s: Session, host: str, binary: str) -> Service:
    from shared_objects import exception
    from shared_objects.objects.service import Service

    try:
        return await Service.get_by_host_and_binary(s.ctxt, host, binary)
    except exception.ServiceNotFound:
        raise CommandError(f"no {binary} service on host {host!r}") from None


async def _set_disabled(args: argparse.Namespace, cfg: FleetConfig, disabled: bool) -> int:
    from conductor.tools.fleetctl._session import session

    async with session(args, cfg) as s:
        svc = await _find_service(s, args.host, args.binary)
        svc.disabled = disabled
        svc.disabled_reason = args.reason if disabled else None
        await svc.save()
    state = "disabled" if disabled else "enabled"
    message(
        args,
        f"{args.binary} on {args.host} {state}",
        {"host": args.host, "binary": args.binary, "disabled": disabled},
    )
    return 0


async def service_disable(args: argparse.Namespace, cfg: FleetConfig) -> int:
    return await _set_disabled(args, cfg, True)


async def service_enable(args: argparse.Namespace, cfg: FleetConfig) -> int:
    return await _set_disabled(args, cfg, False)


async def service_delete(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session

    async with session(args, cfg) as s:
        svc = await _find_service(s, args.host, args.binary)
        if _is_up(svc, cfg):
            raise CommandError(
                f"{args.binary} on {args.host} is up: stop it first (a running service "
                "would only register again)"
            )
        await svc.destroy()
    message(
        args,
        f"{args.binary} on {args.host} deleted",
        {"host": args.host, "binary": args.binary, "deleted": True},
    )
    return 0


async def hosts(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session
    from shared_objects.objects.compute_node import ComputeNodeList

    async with session(args, cfg) as s:
        nodes = await ComputeNodeList.get_all(s.ctxt)
    rows = sorted((object_dict(n, HOST_COLUMNS) for n in nodes), key=lambda r: r["host"])
    emit(args, rows, HOST_COLUMNS)
    return 0


async def find_flavor(s: Session, ref: str) -> Flavor:
    """The flavor whose id or name is ``ref``."""
    from shared_objects import exception
    from shared_objects.objects.flavor import Flavor

    try:
        return await Flavor.get_by_flavor_id(s.ctxt, ref)
    except exception.FlavorNotFound:
        pass
    try:
        return await Flavor.get_by_name(s.ctxt, ref)
    except exception.FlavorNotFound:
        raise CommandError(f"no flavor with id or name {ref!r}") from None


async def flavor_create(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session
    from shared_objects.objects.flavor import Flavor

    async with session(args, cfg) as s:
        flavor = Flavor(
            s.ctxt,
            name=args.name,
            flavorid=args.id or args.name,
            vcpus=args.vcpus,
            memory_mb=args.ram,
            root_gb=args.disk,
        )
        await flavor.create()
    emit(args, object_dict(flavor, FLAVOR_COLUMNS))
    return 0


async def flavor_list(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session
    from shared_objects.objects.flavor import FlavorList

    async with session(args, cfg) as s:
        found = await FlavorList.get_all(s.ctxt)
    rows = sorted((object_dict(f, FLAVOR_COLUMNS) for f in found), key=lambda r: r["name"])
    emit(args, rows, FLAVOR_COLUMNS)
    return 0


async def flavor_delete(args: argparse.Namespace, cfg: FleetConfig) -> int:
    """Instances keep their own copy of the flavor they were built with: they are unaffected."""
    from conductor.tools.fleetctl._session import session

    async with session(args, cfg) as s:
        flavor = await find_flavor(s, args.flavor)
        await flavor.destroy()
    message(
        args,
        f"flavor {flavor.name} ({flavor.flavorid}) deleted",
        {"flavorid": flavor.flavorid, "name": flavor.name, "deleted": True},
    )
    return 0


async def volume_attach(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session
    from conductor.tools.fleetctl.instances import find_instance

    async with session(args, cfg) as s:
        uuid = (await find_instance(s, args.instance)).uuid
        result = await s.tasks.attach_volume(
            s.ctxt, instance_uuid=uuid, volume_id=args.volume_id, device_name=args.device
        )
    emit(args, result)
    return 0


async def volume_detach(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session
    from conductor.tools.fleetctl.instances import find_instance

    async with session(args, cfg) as s:
        uuid = (await find_instance(s, args.instance)).uuid
        await s.tasks.detach_volume(s.ctxt, instance_uuid=uuid, volume_id=args.volume_id)
    emit(args, {"instance_uuid": uuid, "volume_id": args.volume_id, "detached": True})
    return 0


def register_commands(commands: Any) -> None:
    commands.add_parser("services", help="list services and their state").set_defaults(
        func=services
    )
    service = commands.add_parser("service", help="services: list, disable, enable, delete")
    sub = service.add_subparsers(dest="service_command", metavar="COMMAND", required=True)
    sub.add_parser("list", help="list services and their state").set_defaults(func=services)
    for verb, func, what in (
        ("disable", service_disable, "place no new instance on this host"),
        ("enable", service_enable, "place instances on this host again"),
        ("delete", service_delete, "remove the row of a service that is down"),
    ):
        p = sub.add_parser(verb, help=what)
        p.add_argument("host", type=name)
        p.add_argument("--binary", type=name, default=COMPUTE_BINARY, help="default: %(default)s")
        if verb == "disable":
            p.add_argument("--reason", type=name, help="recorded with the flag")
        p.set_defaults(func=func)

    commands.add_parser("hosts", help="compute hosts: capacity and usage").set_defaults(func=hosts)

    flavor = commands.add_parser("flavor", help="flavors").add_subparsers(
        dest="flavor_command", metavar="COMMAND", required=True
    )
    p = flavor.add_parser("create", help="create a flavor")
    p.add_argument("name", type=name)
    p.add_argument("--id", type=name, help="flavor id (default: the name)")
    p.add_argument("--vcpus", type=positive_int, required=True)
    p.add_argument("--ram", type=positive_int, required=True, help="MB")
    p.add_argument("--disk", type=non_negative_int, required=True, help="GB")
    p.set_defaults(func=flavor_create)
    flavor.add_parser("list", help="list flavors").set_defaults(func=flavor_list)
    p = flavor.add_parser("delete", help="delete a flavor (instances keep their copy)")
    p.add_argument("flavor", type=name, help="flavor id or name")
    p.set_defaults(func=flavor_delete)

    volume = commands.add_parser("volume", help="volumes").add_subparsers(
        dest="volume_command", metavar="COMMAND", required=True
    )
    for verb, func in (("attach", volume_attach), ("detach", volume_detach)):
        p = volume.add_parser(verb, help=f"{verb} a volume")
        p.add_argument("instance", type=name, help="instance UUID or name")
        p.add_argument("volume_id", type=name)
        if verb == "attach":
            p.add_argument("--device", type=name, help="e.g. /dev/vdb")
        p.set_defaults(func=func)
