"""Security-group refresh reaches exactly the hosts with member instances (issue 5 g)."""

from __future__ import annotations

from typing import Any

import pytest

from compute_agent.virt.firewall import normalize_rules
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.objects.flavor import Flavor
from shared_objects.objects.security_group_rule import SecurityGroupRuleList

OPS = RequestContext(user_id="ops", project_id="p1")


async def _boot(fleet: Any, wait_for: Any, name: str, host: str, groups: list[str]) -> str:
    (made,) = await fleet.tasks.build_instances(
        OPS, flavor="small", name=name, forced_host=host, security_groups=groups or None
    )

    async def active() -> bool:
        async with fleet.db() as ctxt:
            from shared_objects.objects.instance import Instance

            inst = await Instance.get_by_uuid(ctxt, made["uuid"])
        return inst.vm_state == "active" and inst.task_state is None

    await wait_for(active)
    return str(made["uuid"])


async def test_rule_changes_reach_exactly_the_member_hosts(
    fleet_factory: Any, wait_for: Any
) -> None:
    async with fleet_factory(("host-a", "host-b", "host-c")) as fleet:
        async with fleet.db() as ctxt:
            await Flavor(ctxt, name="small", vcpus=1, memory_mb=256, root_gb=1).create()
        await fleet.tasks.security_group_create(OPS, name="web")
        a = await _boot(fleet, wait_for, "a", "host-a", ["web"])
        b = await _boot(fleet, wait_for, "b", "host-b", ["web"])
        c = await _boot(fleet, wait_for, "c", "host-c", [])

        added = await fleet.tasks.security_group_rule_add(
            OPS, group="web", protocol="tcp", from_port=80, to_port=80, cidr="10.0.0.0/8"
        )
        assert added["refreshed_hosts"] == {"host-a": 1, "host-b": 1}

        async def rules_applied() -> bool:
            for host, uuid in (("host-a", a), ("host-b", b)):
                if not await fleet.driver(host).get_firewall_rules(uuid):
                    return False
            return True

        await wait_for(rules_applied)
        async with fleet.db() as ctxt:
            db_rules = await SecurityGroupRuleList.get_by_instance(ctxt, a)
        expected = normalize_rules(
            [
                {
                    "protocol": r.protocol,
                    "from_port": r.from_port,
                    "to_port": r.to_port,
                    "cidr": r.cidr,
                    "grantee_group_id": r.grantee_group_id,
                }
                for r in db_rules
            ]
        )
        assert await fleet.driver("host-a").get_firewall_rules(a) == expected
        assert await fleet.driver("host-b").get_firewall_rules(b) == expected
        assert await fleet.driver("host-c").get_firewall_rules(c) == []

        removed = await fleet.tasks.security_group_rule_delete(OPS, rule_id=added["rule"]["id"])
        assert removed["refreshed_hosts"] == {"host-a": 1, "host-b": 1}

        async def rules_gone() -> bool:
            return await fleet.driver("host-a").get_firewall_rules(a) == []

        await wait_for(rules_gone)
        listed = await fleet.tasks.security_group_list(OPS)
        assert [(g["name"], sorted(g["instances"]), g["rules"]) for g in listed] == [
            ("web", sorted([a, b]), [])
        ]


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"protocol": "tcp", "from_port": 90, "to_port": 80}, "above to_port"),
        ({"protocol": "gre", "from_port": 1, "to_port": 2}, "protocol must be"),
        ({"protocol": "tcp", "from_port": 1, "to_port": 70000}, "to_port"),
        ({"protocol": "tcp", "from_port": 1, "to_port": 2, "cidr": "nope"}, "not a CIDR"),
    ],
)
async def test_bad_rules_are_refused_and_change_nothing(
    fleet_factory: Any, rule: dict[str, Any], message: str
) -> None:
    async with fleet_factory(("host-a",)) as fleet:
        await fleet.tasks.security_group_create(OPS, name="web")
        with pytest.raises(exception.InvalidRequest, match=message):
            await fleet.tasks.security_group_rule_add(OPS, group="web", **rule)
        (group,) = await fleet.tasks.security_group_list(OPS)
        assert group["rules"] == []
