"""Security groups: operators change rules here; every host with a member instance applies them.

A rule change is committed first, then ``refresh_instance_security_rules`` is cast to the host of
each member instance (all at once, not one after another). Agents read the group's rules from
the database when they apply them, so a refresh that arrives late still applies the newest rules.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter
from typing import Any

import structlog

from conductor.db.session import Database
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.fields import VMState
from shared_objects.objects.instance import Instance, InstanceList
from shared_objects.objects.security_group import SecurityGroup, SecurityGroupList
from shared_objects.objects.security_group_rule import SecurityGroupRule, SecurityGroupRuleList
from shared_objects.rpc_clients.compute import BUILD_REFRESH_VERSION, ComputeAPI
from shared_objects.runtime.messaging import MessageDeliveryFailure

log = structlog.get_logger(__name__)

PROTOCOLS = ("tcp", "udp", "icmp")


def _invalid(reason: str) -> exception.InvalidRequest:
    return exception.InvalidRequest(reason=reason)


def _check_rule(protocol: str, from_port: int, to_port: int, cidr: str) -> str:
    if protocol not in PROTOCOLS:
        raise _invalid(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    limit = 255 if protocol == "icmp" else 65535
    for name, port in (("from_port", from_port), ("to_port", to_port)):
        if isinstance(port, bool) or not isinstance(port, int) or not -1 <= port <= limit:
            raise _invalid(f"{name} must be a whole number from -1 to {limit}, got {port!r}")
    if protocol != "icmp" and from_port > to_port:
        raise _invalid(f"from_port {from_port} is above to_port {to_port}")
    try:
        return str(ipaddress.ip_network(cidr, strict=False))
    except ValueError:
        raise _invalid(f"{cidr!r} is not a CIDR such as 10.0.0.0/8") from None


def rule_dict(rule: SecurityGroupRule) -> dict[str, Any]:
    return {
        "id": rule.id,
        "group_id": rule.parent_group_id,
        "protocol": rule.protocol,
        "from_port": rule.from_port,
        "to_port": rule.to_port,
        "cidr": rule.cidr,
    }


class SecurityGroupTasks:
    def __init__(self, database: Database, compute: ComputeAPI) -> None:
        self.database = database
        self.compute = compute

    async def create(self, ctxt: RequestContext, *, name: str, description: str = "") -> int:
        if not isinstance(name, str) or not name.strip():
            raise _invalid("a security group needs a name")
        project = ctxt.project_id or ""
        async with self.database.request(ctxt):
            try:
                await SecurityGroup.get_by_name(ctxt, project, name)
            except exception.SecurityGroupNotFound:
                pass
            else:
                raise _invalid(f"security group {name!r} already exists")
            group = SecurityGroup(
                ctxt,
                name=name,
                description=description,
                user_id=ctxt.user_id,
                project_id=project,
            )
            await group.create()
        return group.id

    async def list(self, ctxt: RequestContext) -> list[dict[str, Any]]:
        async with self.database.request(ctxt):
            groups = list(await SecurityGroupList.get_by_project(ctxt, ctxt.project_id or ""))
            rules = await SecurityGroupRuleList.get_by_security_group_ids(
                ctxt, [g.id for g in groups]
            )
            # One query for every group's memberships (no query per group).
            members: dict[int, list[str]] = {g.id: [] for g in groups}
            if groups:
                links = await ctxt.db.select(
                    "security_group_instance_association",
                    {"security_group_id": [g.id for g in groups], "deleted": False},
                    columns=["security_group_id", "instance_uuid"],
                )
                for link in links:
                    members[link["security_group_id"]].append(link["instance_uuid"])
        return [
            {
                "id": g.id,
                "name": g.name,
                "description": g.description,
                "rules": [rule_dict(r) for r in rules if r.parent_group_id == g.id],
                "instances": members[g.id],
            }
            for g in groups
        ]

    async def add_rule(
        self,
        ctxt: RequestContext,
        *,
        group: str,
        protocol: str,
        from_port: int,
        to_port: int,
        cidr: str,
    ) -> dict[str, Any]:
        cidr = _check_rule(protocol, from_port, to_port, cidr)
        async with self.database.request(ctxt):
            sg = await SecurityGroup.get_by_name(ctxt, ctxt.project_id or "", group)
            rule = SecurityGroupRule(
                ctxt,
                parent_group_id=sg.id,
                protocol=protocol,
                from_port=from_port,
                to_port=to_port,
                cidr=cidr,
                grantee_group_id=None,
            )
            await rule.create()
        hosts = await self.refresh_members(ctxt, sg.id)
        return {"rule": rule_dict(rule), "refreshed_hosts": hosts}

    async def delete_rule(self, ctxt: RequestContext, *, rule_id: int) -> dict[str, Any]:
        async with self.database.request(ctxt):
            rule = await SecurityGroupRule.get_by_id(ctxt, rule_id)
            group_id = rule.parent_group_id
            await rule.destroy()
        hosts = await self.refresh_members(ctxt, group_id)
        return {"rule_id": rule_id, "refreshed_hosts": hosts}

    async def refresh_members(self, ctxt: RequestContext, group_id: int) -> dict[str, int]:
        """Tell the host of every member to re-apply its rules; ``{host: members}``.

        Active members, and members being built on a host that has already taken them: that
        host read the rules when it took the instance and may have read them before this change;
        from compute RPC 1.2 on, an agent applies a refresh for a build in progress once the
        guest exists (``compute_agent.security_groups.RulesWatch``). An older agent would find
        no guest to refresh and log an error, so it gets none (its build may keep the rules it
        read; the gap release 1.0 always had).
        """
        async with self.database.request(ctxt):
            members = [
                i
                for i in await InstanceList.get_by_security_group(ctxt, group_id)
                if i.host
                and (
                    i.vm_state == VMState.ACTIVE
                    or (
                        i.vm_state == VMState.BUILDING
                        and self.compute.host_speaks(i.host, BUILD_REFRESH_VERSION)
                    )
                )
            ]
        await asyncio.gather(*(self._refresh(ctxt, i) for i in members))
        hosts = dict(Counter(i.host or "" for i in members))
        log.info("security_group_refreshed", group_id=group_id, hosts=hosts)
        return hosts

    async def _refresh(self, ctxt: RequestContext, instance: Instance) -> None:
        host = instance.host or ""
        try:
            await self.compute.refresh_instance_security_rules(ctxt, host, instance=instance)
        except MessageDeliveryFailure as exc:
            # The change is committed; only the nudge is lost (no queue for the host: its agent
            # or the broker is restarting, or the broker is unreachable). Nothing more to do
            # here: an agent re-applies the database's rules to every guest when it starts and
            # after every reconnect of its broker link (compute_agent/security_groups.py), and
            # a host whose queue is missing has not yet done that reconnect. Failing the
            # operator's request would only invite a retry of a change that already happened.
            log.warning(
                "security_group_refresh_not_delivered",
                host=host,
                instance_uuid=instance.uuid,
                error=str(exc),
            )
