"""Applying an instance's security group rules in the hypervisor's firewall."""

from __future__ import annotations

from compute_agent.build import rules_for_driver
from compute_agent.virt.driver import ComputeDriver
from shared_objects.context import RequestContext
from shared_objects.objects.instance import Instance
from shared_objects.objects.security_group_rule import SecurityGroupRuleList


class SecurityGroupManager:
    def __init__(self, driver: ComputeDriver) -> None:
        self.driver = driver

    async def refresh_instance_security_rules(
        self, ctxt: RequestContext, instance: Instance
    ) -> None:
        """Replace the guest's firewall with the rules the database holds now."""
        rules = await SecurityGroupRuleList.get_by_instance(ctxt, instance.uuid)
        await self.driver.refresh_instance_security_rules(instance, rules_for_driver(rules))
