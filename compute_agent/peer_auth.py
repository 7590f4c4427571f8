"""Which peer agent may call this agent's live-migration methods.

The RPC server lets conductors call everything and agents call only the peer methods
(``shared_objects.policy.COMPUTE_RPC_POLICY``). For an agent caller, the handler then asks
:class:`PeerCheck` whether the Migration row names the caller's host as the other side of a
migration of that instance. The row is read from the conductor (never taken from the message,
which the caller wrote) and the read itself runs under this agent's ownership scope, so only a
migration this host takes part in can be found at all.

* ``during``: the migration named in the call is unfinished, moves ``instance_uuid`` and has the
  caller on the expected side (the source calls the destination's ``pre_live_migration``,
  ``post_live_migration_at_destination`` and ``rollback_live_migration_at_destination``; the
  destination calls the source's ``check_can_live_migrate_source``).
* ``recovery``: the instance's newest migration is between the caller and this host, whatever its
  status (a crash may have left it undecided or in error): ``get_live_migration_guest`` and
  ``settle_live_migration_peer``, which recovery uses to decide from both hypervisors.
"""

from __future__ import annotations

from shared_objects.context import RequestContext
from shared_objects.objects.migration import Migration, MigrationList
from shared_objects.runtime import audit
from shared_objects.runtime.authorizer import forbidden
from shared_objects.runtime.identity import Caller, Role
from shared_objects.runtime.messaging import ExpectedException


class PeerCheck:
    """Peer checks of one agent (``host``)."""

    def __init__(self, host: str) -> None:
        self.host = host

    @staticmethod
    def _agent_caller(ctxt: RequestContext) -> Caller | None:
        """The caller when it is an agent (the only role that needs checking here)."""
        principal = ctxt.principal
        if isinstance(principal, Caller) and principal.role is Role.CONDUCTOR:
            return None
        if isinstance(principal, Caller) and principal.role is Role.AGENT:
            return principal
        # No principal: a server without authorisation (should not happen in a service).
        who = principal if isinstance(principal, Caller) else None
        raise ExpectedException(forbidden(who, "peer call", ""))

    async def during(
        self,
        ctxt: RequestContext,
        action: str,
        instance_uuid: str,
        *,
        migration_uuid: str | None,
        caller_is: str,
    ) -> None:
        """Allow a conductor, or the agent on side ``caller_is`` (``"source"`` or ``"dest"``)
        of the unfinished migration ``migration_uuid`` (or, when None, of the instance's newest
        unfinished migration)."""
        caller = self._agent_caller(ctxt)
        if caller is None:
            return
        migration = await self._find(ctxt, instance_uuid, migration_uuid)
        reason = None
        if migration is None:
            reason = "no migration of this instance"
        elif migration.instance_uuid != instance_uuid:
            reason = f"migration {migration.uuid} moves another instance"
        elif migration.is_finished:
            reason = f"migration {migration.uuid} is {migration.status}"
        else:
            mine, theirs = (
                (migration.dest_compute, migration.source_compute)
                if caller_is == "source"
                else (migration.source_compute, migration.dest_compute)
            )
            if mine != self.host or not caller.speaks_for(theirs):
                reason = (
                    f"migration {migration.uuid} is {migration.source_compute} -> "
                    f"{migration.dest_compute}, the caller is not its {caller_is}"
                )
        if reason is not None:
            self._refuse(caller, action, instance_uuid, reason)

    async def recovery(self, ctxt: RequestContext, action: str, instance_uuid: str) -> None:
        """Allow a conductor, or the agent on the other side of the instance's newest
        migration (any status)."""
        caller = self._agent_caller(ctxt)
        if caller is None:
            return
        migration = await self._find(ctxt, instance_uuid, None, unfinished_only=False)
        sides = (
            {migration.source_compute, migration.dest_compute} if migration is not None else set()
        )
        if self.host not in sides or not any(caller.speaks_for(h) for h in sides - {self.host}):
            self._refuse(caller, action, instance_uuid, "no migration between these hosts")

    async def _find(
        self,
        ctxt: RequestContext,
        instance_uuid: str,
        migration_uuid: str | None,
        *,
        unfinished_only: bool = True,
    ) -> Migration | None:
        if migration_uuid is not None:
            return await Migration.get_by_uuid(ctxt, migration_uuid)
        candidates = [
            m
            for m in await MigrationList.get_by_instance(ctxt, instance_uuid)
            if not (unfinished_only and m.is_finished)
        ]
        return max(candidates, key=lambda m: m.id) if candidates else None

    @staticmethod
    def _refuse(caller: Caller, action: str, target: str, reason: str) -> None:
        audit.refused(caller, action, target, reason)
        raise ExpectedException(forbidden(caller, action, target))
