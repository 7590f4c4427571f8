"""Who may run which remotable object method: the conductor's half of ``shared_objects.policy``.

For every object call the indirection endpoint asks :meth:`ObjectPolicy.admit` *before* the
method runs. Conductors and operators run everything unscoped. An agent gets, per
``OBJECT_POLICY``:

* ``DENY``: refused here, nothing runs;
* ``ANY``: runs unscoped (fleet-wide facts such as flavors and service versions);
* ``OWN``: runs under an :class:`~conductor.db.ownership.OwnerScope` of its hosts, which the
  database layer turns into conditions inside each statement: a row that is not the caller's is
  neither read nor written, and the statement that would have changed it refuses instead
  (``Forbidden``). No extra query is made when the call is allowed.

Arguments that name a host (``InstanceList.get_by_host(host=...)``) must name the caller's own,
and ``Service.register`` is also held to the compute binary, the compute topic and the service
versions this conductor supports: a forged registration can neither impersonate a conductor nor
claim a release that does not exist.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from conductor.db.ownership import OwnerScope
from shared_objects import exception, releases
from shared_objects.policy import OBJECT_POLICY, Access, ObjectRule
from shared_objects.runtime import audit
from shared_objects.runtime.authorizer import forbidden
from shared_objects.runtime.identity import Caller, Identities, Role

_COMPUTE_TOPIC = "compute"


@dataclasses.dataclass(frozen=True, slots=True)
class Admission:
    """The decision for one allowed call: its scope (None: unscoped) and whether it writes."""

    caller: Caller
    action: str
    scope: OwnerScope | None
    writes: bool


class ObjectPolicy:
    """Applies ``OBJECT_POLICY`` to callers resolved from their broker login."""

    def __init__(self, identities: Identities) -> None:
        self.identities = identities
        self._scopes: dict[Caller, OwnerScope] = {}

    def caller(self, ctxt: Any) -> Caller:
        principal = getattr(ctxt, "principal", None)
        if not isinstance(principal, Caller):
            principal = self.identities.resolve(getattr(ctxt, "caller", None))
            ctxt.principal = principal
        return principal

    def admit(
        self,
        ctxt: Any,
        objname: str,
        method: str,
        signature: inspect.Signature,
        lead: tuple[Any, ...],
        args: list[Any],
        kwargs: Mapping[str, Any],
    ) -> Admission:
        """The admission of ``objname.method`` for ``ctxt``'s caller, or ``Forbidden``."""
        caller = self.caller(ctxt)
        action = f"{objname}.{method}"
        rule = OBJECT_POLICY.get((objname, method))
        writes = rule.writes if rule is not None else True
        if caller.is_privileged:
            return Admission(caller, action, None, writes)
        if caller.role is not Role.AGENT:
            self._refuse(caller, action, objname, "this login has no role in the fleet")
        if rule is None or rule.agent is Access.DENY:
            self._refuse(caller, action, objname, "agents may not call this method")
        assert rule is not None
        if rule.host_arg is not None or (objname, method) == ("Service", "register"):
            bound = signature.bind(*lead, *args, **kwargs).arguments
            self._check_arguments(caller, action, rule, objname, method, bound)
        if rule.agent is Access.ANY:
            return Admission(caller, action, None, writes)
        return Admission(caller, action, self._scope(caller), writes)

    def _scope(self, caller: Caller) -> OwnerScope:
        scope = self._scopes.get(caller)
        if scope is None:
            scope = self._scopes[caller] = OwnerScope(hosts=caller.hosts, login=caller.login)
        return scope

    def _check_arguments(
        self,
        caller: Caller,
        action: str,
        rule: ObjectRule,
        objname: str,
        method: str,
        bound: Mapping[str, Any],
    ) -> None:
        if rule.host_arg is not None:
            host = bound.get(rule.host_arg)
            if not caller.speaks_for(host):
                self._refuse(caller, action, host, f"{rule.host_arg} {host!r} is not the caller's")
        if (objname, method) == ("Service", "register"):
            binary, topic, version = bound.get("binary"), bound.get("topic"), bound.get("version")
            if binary != releases.BINARY_COMPUTE or topic != _COMPUTE_TOPIC:
                self._refuse(
                    caller,
                    action,
                    bound.get("host"),
                    f"agents register {releases.BINARY_COMPUTE!r} on topic "
                    f"{_COMPUTE_TOPIC!r}, not {binary!r} on {topic!r}",
                )
            oldest = releases.RELEASES[0].service_version
            if not isinstance(version, int) or not oldest <= version <= releases.SERVICE_VERSION:
                self._refuse(
                    caller,
                    action,
                    bound.get("host"),
                    f"service version {version!r} is outside the supported range "
                    f"{oldest}..{releases.SERVICE_VERSION}",
                )

    @staticmethod
    def _refuse(caller: Caller, action: str, target: Any, reason: str) -> None:
        audit.refused(caller, action, target, reason)
        raise forbidden(caller, action, target)


def refused_inside(admission: Admission, target: Any, exc: exception.Forbidden) -> None:
    """Audit a refusal raised inside a statement (the ownership scope said no)."""
    audit.refused(admission.caller, admission.action, target, exc.message)


def accepted(admission: Admission, target: Any) -> None:
    """Audit an accepted change (reads are not audited: they change nothing)."""
    if admission.writes:
        audit.accepted(admission.caller, admission.action, target)
