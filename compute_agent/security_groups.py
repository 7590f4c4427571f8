"""Applying an instance's security group rules in the hypervisor's firewall, including for
instances still being built here."""

from __future__ import annotations

from typing import Any

import structlog

from compute_agent.virt.driver import ComputeDriver
from shared_objects.context import RequestContext
from shared_objects.objects.instance import Instance
from shared_objects.objects.security_group_rule import SecurityGroupRuleList

log = structlog.get_logger(__name__)


def rules_for_driver(rules: SecurityGroupRuleList) -> list[dict[str, Any]]:
    """Security group rules in the driver's plain form."""
    return [
        {
            "protocol": r.protocol,
            "from_port": r.from_port,
            "to_port": r.to_port,
            "cidr": r.cidr,
            "grantee_group_id": r.grantee_group_id,
        }
        for r in rules
    ]


class RulesWatch:
    """Builds on this host between reading their rules and having a guest.

    A build reads its instance's rules right after taking the instance; a rule change committed
    after that read is cast to this host (the instance's host is set by then) but finds no guest
    to apply it to. The watch remembers such changes and the build applies the current rules
    once its guest exists, so no build comes up with rules older than the last change.
    """

    def __init__(self) -> None:
        self._building: set[str] = set()
        self._changed: set[str] = set()

    def start(self, uuid: str) -> None:
        """Call before the build reads the rules."""
        self._building.add(uuid)
        self._changed.discard(uuid)

    def note_change(self, uuid: str) -> bool:
        """A refresh arrived; True when it is for a build in progress (remembered for it)."""
        if uuid in self._building:
            self._changed.add(uuid)
            return True
        return False

    def finish(self, uuid: str) -> bool:
        """Call once the guest exists (or the build gave up); True when rules changed since the
        build read them. From here on refreshes go straight to the guest."""
        self._building.discard(uuid)
        if uuid in self._changed:
            self._changed.discard(uuid)
            return True
        return False


class SecurityGroupManager:
    def __init__(self, driver: ComputeDriver, watch: RulesWatch | None = None) -> None:
        self.driver = driver
        self.watch = watch if watch is not None else RulesWatch()

    async def refresh_instance_security_rules(
        self, ctxt: RequestContext, instance: Instance
    ) -> None:
        """Replace the guest's firewall with the rules the database holds now (for a build in
        progress: once its guest exists)."""
        if self.watch.note_change(instance.uuid):
            log.info("security_rules_refresh_deferred_to_build", instance_uuid=instance.uuid)
            return
        rules = await SecurityGroupRuleList.get_by_instance(ctxt, instance.uuid)
        await self.driver.refresh_instance_security_rules(instance, rules_for_driver(rules))
