"""Role checks for every RPC request a Fleet server receives (the RPC runtime's authorizer hook).

The caller's role comes only from the broker-validated login (``ctxt.caller``, the AMQP
``user_id``) through ``shared_objects.runtime.identity``; the resolved
:class:`~shared_objects.runtime.identity.Caller` is left in ``ctxt.principal`` for the handler,
which makes the finer, per-row decisions (the conductor's object policy, the agents' live-migration
peer check). The tables are in ``shared_objects.policy``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.runtime import audit
from shared_objects.runtime.identity import Caller, Identities, Role
from shared_objects.runtime.messaging import Target

RpcTable = Mapping[tuple[str | None, str], frozenset[Role]]


class RoleAuthorizer:
    """Allows a request when the caller's role is listed for its (namespace, method)."""

    def __init__(self, identities: Identities, table: RpcTable, *, service: str) -> None:
        self.identities = identities
        self.table = table
        self.service = service

    def covers(self, namespace: str | None, method: str) -> bool:
        return (namespace, method) in self.table

    def caller(self, ctxt: RequestContext) -> Caller:
        """The resolved caller of ``ctxt`` (cached in ``ctxt.principal``)."""
        principal = ctxt.principal
        if not isinstance(principal, Caller):
            principal = ctxt.principal = self.identities.resolve(ctxt.caller)
        return principal

    def authorize(self, ctxt: RequestContext, namespace: str | None, method: str) -> None:
        caller = self.caller(ctxt)
        roles = self.table.get((namespace, method), frozenset())
        if caller.role in roles:
            return
        action = f"{namespace}.{method}" if namespace else method
        reason = (
            f"login {caller.login!r} has no role here"
            if caller.role is Role.UNKNOWN
            else f"{caller.role.value}s may not call {action} on the {self.service}"
        )
        audit.refused(caller, action, self.service, reason)
        raise forbidden(caller, action, self.service)


def forbidden(caller: Caller | None, action: str, target: object) -> exception.Forbidden:
    """The error a refused caller gets back (its text names no more than the caller sent)."""
    return exception.Forbidden(
        caller=caller.login if caller is not None and caller.login else "an unauthenticated caller",
        action=action,
        target=str(target)[:200],
    )


COMPUTE_TOPIC = "compute"


def reply_checks(identities: Identities) -> Callable[[Target], Callable[[str | None], bool]]:
    """Who may answer a call (the RPC clients' ``reply_from``): the agent of the host a
    ``compute.<host>`` call went to, and a conductor for everything else (``conductor`` and
    the compute-task API). A reply from anyone else is dropped, however well it is forged."""
    conductor = identities.is_conductor
    per_host: dict[str, Callable[[str | None], bool]] = {}

    def for_target(target: Target) -> Callable[[str | None], bool]:
        if target.topic == COMPUTE_TOPIC and target.server:
            check = per_host.get(target.server)
            if check is None:
                logins = identities.host_logins(target.server)
                check = per_host[target.server] = lambda login: login in logins
            return check
        return conductor

    return for_target
