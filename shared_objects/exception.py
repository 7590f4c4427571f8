"""Errors of the object layer, shared by agents and the conductor.

This module is in every RPC transport's ``allowed_remote_exmods``: an error raised in the
conductor while serving an object call is rebuilt on the agent as the same class. That only works
if every class here can be re-created from ``cls(*args, **kwargs)`` (oslo's failure format sends
the message as ``args[0]`` and the format values as ``kwargs``), which ``FleetException`` ensures.
"""

from __future__ import annotations

from typing import Any, ClassVar


class FleetException(Exception):
    """Base class: a message built from ``msg_fmt`` and keyword arguments kept in ``kwargs``."""

    msg_fmt: ClassVar[str] = "An unknown error occurred."

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        self.kwargs = kwargs
        if message is None:
            try:
                message = self.msg_fmt % kwargs
            except (KeyError, TypeError, ValueError):
                # A caller passed the wrong format keys: keep what we have rather than fail
                # while reporting another error.
                message = f"{self.msg_fmt} ({kwargs!r})"
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.msg_fmt


class NoDatabaseAccess(FleetException):
    msg_fmt = (
        "No database access on this service: %(objname)s.%(method)s needs the conductor "
        "(set FleetObject.indirection_api to a conductor client)"
    )


class ObjectAttributeNotLoaded(FleetException):
    msg_fmt = (
        "%(objname)s.%(attr)s is not loaded and objects never lazy-load: name it in "
        "expected_attrs when you fetch the object (e.g. expected_attrs=['%(attr)s'])"
    )


class OrphanedObjectError(FleetException):
    msg_fmt = "Cannot call %(objname)s.%(method)s on an object without a context"


class ObjectActionError(FleetException):
    msg_fmt = "Object action %(action)s failed because: %(reason)s"


class NotFound(FleetException):
    # Expected answers to a request, not faults: the RPC server logs them at this level without
    # a traceback (shared_objects/messaging/server.py); subclasses inherit it.
    rpc_log_level: ClassVar[str] = "info"
    msg_fmt = "Resource could not be found."


class InstanceNotFound(NotFound):
    msg_fmt = "Instance %(instance_uuid)s could not be found."


class FlavorNotFound(NotFound):
    msg_fmt = "Flavor %(flavor_id)s could not be found."


class ComputeHostNotFound(NotFound):
    msg_fmt = "Compute node %(host)s/%(node)s could not be found."


class ServiceNotFound(NotFound):
    msg_fmt = "Service %(service_id)s could not be found."


class MigrationNotFound(NotFound):
    msg_fmt = "Migration %(migration_id)s could not be found."


class BlockDeviceMappingNotFound(NotFound):
    msg_fmt = "Block device mapping %(bdm_id)s could not be found."


class SecurityGroupNotFound(NotFound):
    msg_fmt = "Security group %(security_group_id)s could not be found."


class SecurityGroupRuleNotFound(NotFound):
    msg_fmt = "Security group rule %(rule_id)s could not be found."


class InstanceActionNotFound(NotFound):
    msg_fmt = "Action for request %(request_id)s on instance %(instance_uuid)s not found."


class InstanceFaultNotFound(NotFound):
    msg_fmt = "No fault recorded for instance %(instance_uuid)s."


class Conflict(FleetException):
    rpc_log_level: ClassVar[str] = "info"
    msg_fmt = "Conflicting change."


class UnexpectedTaskStateError(Conflict):
    msg_fmt = (
        "Unexpected task state on instance %(instance_uuid)s: expecting %(expected)s "
        "but the state is %(actual)s"
    )


class UnexpectedVMStateError(Conflict):
    msg_fmt = (
        "Unexpected VM state on instance %(instance_uuid)s: expecting %(expected)s "
        "but the state is %(actual)s"
    )


class UnexpectedDeletingTaskStateError(UnexpectedTaskStateError):
    pass


class ObjectAlreadyExists(Conflict):
    msg_fmt = "%(objname)s %(key)s already exists."


class DatabaseConflict(Conflict):
    msg_fmt = "The database refused the change to %(table)s: %(reason)s"


class ObjectAlreadyCreated(ObjectActionError):
    msg_fmt = "%(objname)s was already created (it has an id)."


class IndirectionError(FleetException):
    """Base class of the conductor's refusals of an object call (bad input from the wire)."""

    msg_fmt = "Object call refused."


class UnknownObject(IndirectionError):
    msg_fmt = "Unknown object type %(objname)r: not a registered Fleet object."


class ObjectMethodNotAllowed(IndirectionError):
    msg_fmt = (
        "%(objname)s.%(method)s cannot be called remotely: only methods marked remotable "
        "are allowed"
    )


class UnsupportedObjectVersion(IndirectionError):
    msg_fmt = (
        "%(objname)s version %(version)s is not supported by this conductor "
        "(it serves %(supported)s); conductors must be upgraded first"
    )


class InvalidObjectPrimitive(IndirectionError):
    msg_fmt = "Malformed object primitive: %(reason)s"


class InvalidObjectCall(IndirectionError):
    msg_fmt = "Invalid call of %(objname)s.%(method)s: %(reason)s"


class Forbidden(FleetException):
    """The caller (as the broker validated it) may not do this; nothing was changed.

    Raised by the conductor's and the agents' authorisation (``docs/security.md``): by the
    policy table before a call runs, or by the ownership condition inside the statement that
    would have acted. ``caller`` is the broker login, ``action`` what was asked, ``target``
    what it would have touched.
    """

    msg_fmt = "Forbidden: %(caller)s may not %(action)s %(target)s"
    # Marks the refusal for the RPC runtime (shared_objects/messaging/authorization.py): counted
    # as outcome "forbidden", never logged there with a traceback (the audit line says it all).
    rpc_outcome: ClassVar[str] = "forbidden"
    rpc_log_level: ClassVar[str] = "warning"


class WrongIdentity(FleetException):
    """A service configured with a broker login that is not its own (docs/security.md)."""

    msg_fmt = (
        "this %(service)s logs in to the broker as %(login)r, which is not %(expected)s "
        "([security] in the configuration; see docs/security.md)"
    )


class SchemaNotAtHead(FleetException):
    msg_fmt = (
        "The database schema revision is %(current)s but this release needs %(head)s: run "
        "`fleetctl db upgrade` first"
    )


class InvalidRequest(FleetException):
    """An operator or API request that cannot be carried out as asked (nothing was changed)."""

    msg_fmt = "Invalid request: %(reason)s"
    rpc_log_level: ClassVar[str] = "info"


class ServiceTooNew(FleetException):
    """An agent of a release newer than every conductor: conductors must be upgraded first."""

    msg_fmt = (
        "This %(binary)s is release %(release)s (service version %(version)s) but the newest "
        "live conductor is service version %(conductor_version)s: upgrade the conductors first"
    )


class ServiceTooOld(FleetException):
    """Compute services older than the oldest release this conductor still supports."""

    msg_fmt = (
        "Compute services %(hosts)s run service version %(version)s, older than the oldest "
        "supported release %(oldest)s (service version %(oldest_version)s): upgrade them first"
    )


class DatabaseUnavailable(FleetException):
    """The conductor could not reach its database (connection refused or lost, server shutting
    down or starting up, pool exhausted): nothing was committed by the request that failed
    (or, if the connection died during the commit, the caller cannot know); trying again later
    may succeed.

    Raised by the conductor at the boundary where object and compute-task calls are dispatched
    (``conductor/db/errors.py``), so agents catch one class instead of a driver error they
    cannot import. Agents' flows retry it with a bound (``compute_agent/transient.py``).
    """

    msg_fmt = "The database is unavailable (%(reason)s); retry later"
    retryable: ClassVar[bool] = True
    # Counted by the RPC runtime under this outcome, not as a handler error.
    rpc_outcome: ClassVar[str] = "unavailable"
