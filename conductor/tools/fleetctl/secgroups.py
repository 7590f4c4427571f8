"""``fleetctl secgroup create|list|delete|rule-add|rule-delete``: security groups and their
rules."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from conductor.tools.fleetctl._base import CommandError, name, port, positive_int
from conductor.tools.fleetctl._output import emit, message

if TYPE_CHECKING:
    from shared_objects.runtime.config import FleetConfig

GROUP_COLUMNS = ("id", "name", "rules", "instances")
RULE_COLUMNS = ("id", "group_id", "protocol", "from_port", "to_port", "cidr")


async def create(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session

    async with session(args, cfg) as s:
        group_id = await s.tasks.security_group_create(
            s.ctxt, name=args.name, description=args.description
        )
    emit(args, {"id": group_id, "name": args.name})
    return 0


async def list_(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session

    async with session(args, cfg) as s:
        groups = await s.tasks.security_group_list(s.ctxt)
    if args.format in ("json", "yaml") and not args.column:
        emit(args, groups, GROUP_COLUMNS)
        return 0
    rows = []
    for g in groups:
        rules = ", ".join(
            f"#{r['id']} {r['protocol']} {r['from_port']}-{r['to_port']} {r['cidr']}"
            for r in g["rules"]
        )
        rows.append({**g, "rules": rules or "-", "instances": len(g["instances"])})
    emit(args, rows, GROUP_COLUMNS)
    return 0


async def delete(args: argparse.Namespace, cfg: FleetConfig) -> int:
    """Delete a group no instance is a member of (its rules go with it)."""
    from conductor.tools.fleetctl._session import session
    from shared_objects import exception
    from shared_objects.objects.instance import InstanceList
    from shared_objects.objects.security_group import SecurityGroup

    async with session(args, cfg) as s:
        try:
            if args.group.isdigit():
                group = await SecurityGroup.get_by_id(s.ctxt, int(args.group))
            else:
                group = await SecurityGroup.get_by_name(s.ctxt, s.ctxt.project_id or "", args.group)
        except exception.SecurityGroupNotFound:
            raise CommandError(f"no security group {args.group!r}") from None
        members = await InstanceList.get_by_security_group(s.ctxt, group.id)
        if len(members):
            raise CommandError(
                f"security group {group.name!r} is used by {len(members)} instance(s): "
                + ", ".join(i.uuid for i in list(members)[:5])
            )
        await group.destroy()
    message(
        args,
        f"security group {group.name} (#{group.id}) deleted",
        {"id": group.id, "name": group.name, "deleted": True},
    )
    return 0


async def rule_add(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session

    if args.from_port > args.to_port:
        from conductor.tools.fleetctl._base import UsageError

        raise UsageError(f"--from-port {args.from_port} is above --to-port {args.to_port}")
    async with session(args, cfg) as s:
        result = await s.tasks.security_group_rule_add(
            s.ctxt,
            group=args.group,
            protocol=args.protocol,
            from_port=args.from_port,
            to_port=args.to_port,
            cidr=args.cidr,
        )
    _report(args, result)
    return 0


async def rule_delete(args: argparse.Namespace, cfg: FleetConfig) -> int:
    from conductor.tools.fleetctl._session import session

    async with session(args, cfg) as s:
        result = await s.tasks.security_group_rule_delete(s.ctxt, rule_id=args.rule_id)
    _report(args, result)
    return 0


def _report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    hosts = result["refreshed_hosts"]
    where = ", ".join(f"{h} ({n})" for h, n in sorted(hosts.items())) or "no host"
    message(args, f"rules refreshed on {where}", result)


def register_commands(commands: Any) -> None:
    secgroup = commands.add_parser("secgroup", help="security groups").add_subparsers(
        dest="secgroup_command", metavar="COMMAND", required=True
    )
    p = secgroup.add_parser("create", help="create a security group")
    p.add_argument("name", type=name)
    p.add_argument("--description", default="")
    p.set_defaults(func=create)
    secgroup.add_parser("list", help="groups, their rules and member count").set_defaults(
        func=list_
    )
    p = secgroup.add_parser("delete", help="delete a group no instance uses")
    p.add_argument("group", type=name, help="group name or id")
    p.set_defaults(func=delete)
    p = secgroup.add_parser("rule-add", help="add a rule; member hosts apply it")
    p.add_argument("group", type=name)
    p.add_argument("--protocol", required=True, choices=("tcp", "udp", "icmp"))
    p.add_argument("--from-port", type=port, required=True)
    p.add_argument("--to-port", type=port, required=True)
    p.add_argument("--cidr", type=name, default="0.0.0.0/0")
    p.set_defaults(func=rule_add)
    p = secgroup.add_parser("rule-delete", help="delete a rule; member hosts apply it")
    p.add_argument("rule_id", type=positive_int)
    p.set_defaults(func=rule_delete)
