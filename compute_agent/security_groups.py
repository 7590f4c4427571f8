"""Applying an instance's security group rules in the hypervisor's firewall, including for
instances still being built here.

Rule changes arrive as ``refresh_instance_security_rules`` casts, which a broker restart (or a
lost link) can drop without anyone noticing. So the agent also re-applies the database's rules
to every guest it runs, level-triggered: at start and after every reconnect of its transport
(``RulesResync``: one resync at a time, a request during one schedules one more). A resync
costs two conductor calls whatever the number of guests and changes only guests whose rules
differ.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

import structlog

from compute_agent.transient import TRANSIENT_ERRORS, Retrier, short
from compute_agent.virt.driver import ComputeDriver
from compute_agent.virt.exceptions import InstanceNotFound, VirtError
from compute_agent.virt.firewall import normalize_rules
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.objects.instance import Instance, InstanceList
from shared_objects.objects.security_group_rule import SecurityGroupRule, SecurityGroupRuleList

log = structlog.get_logger(__name__)


def rules_for_driver(rules: Iterable[SecurityGroupRule]) -> list[dict[str, Any]]:
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

    def note_change_for_all(self) -> set[str]:
        """Rules may have changed unseen (a resync): every build in progress applies the
        current rules once its guest exists. Returns their UUIDs."""
        self._changed |= self._building
        return set(self._building)

    def finish(self, uuid: str) -> bool:
        """Call once the guest exists (or the build gave up); True when rules changed since the
        build read them. From here on refreshes go straight to the guest."""
        self._building.discard(uuid)
        if uuid in self._changed:
            self._changed.discard(uuid)
            return True
        return False


@dataclasses.dataclass(slots=True)
class ResyncResult:
    """What one resync did: guests compared, guests whose rules it replaced, builds left to
    apply the current rules themselves, guests it could not update."""

    checked: int = 0
    changed: int = 0
    deferred: int = 0
    failed: int = 0


class SecurityGroupManager:
    def __init__(self, driver: ComputeDriver, watch: RulesWatch | None = None) -> None:
        self.driver = driver
        self.watch = watch if watch is not None else RulesWatch()
        # Read-and-apply is serialised (refreshes and resyncs alike): whichever read the
        # database last applies last, so an older read never overwrites a newer one.
        self._apply = asyncio.Lock()

    async def refresh_instance_security_rules(
        self, ctxt: RequestContext, instance: Instance
    ) -> None:
        """Replace the guest's firewall with the rules the database holds now (for a build in
        progress: once its guest exists)."""
        if self.watch.note_change(instance.uuid):
            log.info("security_rules_refresh_deferred_to_build", instance_uuid=instance.uuid)
            return
        async with self._apply:
            rules = await SecurityGroupRuleList.get_by_instance(ctxt, instance.uuid)
            await self.driver.refresh_instance_security_rules(instance, rules_for_driver(rules))

    async def resync(self, ctxt: RequestContext, calls: Retrier, reason: str) -> ResyncResult:
        """Make every guest's firewall equal the database's rules for its instance.

        Two conductor calls in all: the guests' instances with their groups, then the rules of
        those groups (both read under this host's ownership scope). Guests whose rules already
        match are left alone; builds in progress re-read their rules once their guest exists.
        """
        result = ResyncResult()
        async with self._apply:
            building = self.watch.note_change_for_all()
            uuids = [u for u in await self.driver.list_instance_uuids() if u not in building]
            result.deferred = len(building)
            instances: list[Instance] = []
            if uuids:
                instances = [
                    i
                    for i in await calls.call(
                        "read instances for rules",
                        lambda: InstanceList.get_by_uuids(
                            ctxt, uuids, expected_attrs=["security_groups"]
                        ),
                    )
                    if not i.deleted
                ]
            group_ids = sorted({g.id for i in instances for g in i.security_groups})
            by_group: dict[int, list[SecurityGroupRule]] = {gid: [] for gid in group_ids}
            if group_ids:
                rules = await calls.call(
                    "read rules",
                    lambda: SecurityGroupRuleList.get_by_security_group_ids(ctxt, group_ids),
                )
                for rule in rules:
                    by_group.setdefault(rule.parent_group_id, []).append(rule)
            for instance in instances:
                wanted = rules_for_driver(
                    r for g in instance.security_groups for r in by_group.get(g.id, ())
                )
                if await self._apply_if_different(instance, wanted, result):
                    result.changed += 1
        log.info(
            "security_rules_resynced",
            reason=reason,
            checked=result.checked,
            changed=result.changed,
            deferred=result.deferred,
            failed=result.failed,
        )
        return result

    async def _apply_if_different(
        self, instance: Instance, wanted: list[dict[str, Any]], result: ResyncResult
    ) -> bool:
        try:
            have = await self.driver.get_firewall_rules(instance.uuid)
        except InstanceNotFound:
            return False  # the guest went away since it was listed
        result.checked += 1
        try:
            if have == normalize_rules(wanted):
                return False
            await self.driver.refresh_instance_security_rules(instance, wanted)
        except InstanceNotFound:
            return False
        except VirtError as exc:
            result.failed += 1
            log.warning(
                "security_rules_resync_guest_failed",
                instance_uuid=instance.uuid,
                error=short(exc),
            )
            return False
        log.info("security_rules_resync_applied", instance_uuid=instance.uuid, rules=len(wanted))
        return True


class RulesResync:
    """Runs resyncs in the background, one at a time.

    ``request`` while a resync runs schedules exactly one more after it (that one may have read
    the database before whatever prompted the request); more requests meanwhile add nothing.
    ``spawn`` starts the task (the agent runs it in its own context, under its login).
    """

    def __init__(
        self,
        run: Callable[[str], Awaitable[Any]],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    ) -> None:
        self._run = run
        self._spawn = spawn
        self._task: asyncio.Task[None] | None = None
        self._again: str | None = None
        self._stopped = False
        #: Resyncs finished (with or without an error), for tests and stats.
        self.runs = 0

    def start(self, reason: str = "start") -> None:
        """Accept requests (again, after ``stop``) and resync now."""
        self._stopped = False
        self.request(reason)

    def request(self, reason: str) -> None:
        """Resync soon (``reason`` goes into the log line). Never blocks."""
        if self._stopped:
            return
        if self._task is not None and not self._task.done():
            self._again = reason
            return
        self._task = self._spawn(self._loop(reason))
        self._task.add_done_callback(self._done)

    async def _loop(self, reason: str) -> None:
        next_reason: str | None = reason
        while next_reason is not None:
            self._again = None
            try:
                await self._run(next_reason)
            except TRANSIENT_ERRORS as exc:
                # Nothing to retry on here: the next reconnect (or start) asks again.
                log.warning("security_rules_resync_failed", reason=next_reason, error=short(exc))
            except exception.FleetException as exc:
                log.warning("security_rules_resync_failed", reason=next_reason, error=short(exc))
            self.runs += 1
            next_reason = self._again

    @staticmethod
    def _done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("security_rules_resync_crashed", error=repr(task.exception()))

    async def wait_idle(self) -> None:
        """Until no resync runs or is scheduled (tests; the agent's stop)."""
        while self._task is not None and not self._task.done():
            await asyncio.wait([self._task])

    async def stop(self) -> None:
        """No more resyncs; one running is cancelled (its guests keep what it applied)."""
        self._stopped = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
