"""Fleet's errors: one tree, shared by agents, conductors and tools.

Every error a Fleet service raises for another one to catch derives from ``FleetException``::

    FleetException                      msg_fmt % kwargs; rebuilt remotely as cls(*args, **kwargs)
    ├── NoDatabaseAccess                an object call that needs the conductor, made without one
    ├── ObjectAttributeNotLoaded        objects never lazy-load: name it in expected_attrs
    ├── OrphanedObjectError             a remotable call on an object without a context
    ├── ObjectActionError
    │   └── ObjectAlreadyCreated
    ├── NotFound
    │   ├── InstanceNotFound            no such instance (database, or the host's hypervisor)
    │   ├── FlavorNotFound, ComputeHostNotFound, ServiceNotFound, MigrationNotFound
    │   ├── BlockDeviceMappingNotFound, SecurityGroupNotFound, SecurityGroupRuleNotFound
    │   └── InstanceActionNotFound, InstanceFaultNotFound
    ├── Conflict
    │   ├── UnexpectedTaskStateError
    │   │   └── UnexpectedDeletingTaskStateError
    │   ├── UnexpectedVMStateError
    │   ├── ObjectAlreadyExists
    │   └── DatabaseConflict
    ├── IndirectionError                the conductor refused an object call (bad input)
    │   ├── UnknownObject, ObjectMethodNotAllowed, UnsupportedObjectVersion
    │   └── InvalidObjectPrimitive, InvalidObjectCall
    ├── Forbidden                       rpc_outcome "forbidden" (docs/security.md)
    ├── WrongIdentity                   a service started on a broker login not its own
    ├── SchemaNotAtHead
    ├── InvalidRequest                  an operator/API request that cannot be done as asked
    ├── ServiceTooNew, ServiceTooOld    upgrade order (docs/upgrades.md)
    ├── DatabaseUnavailable             retryable; rpc_outcome "unavailable"
    ├── NoValidHost                     the scheduler found no host (conductor)
    ├── InsufficientResources           a host cannot take an instance (claim or hypervisor)
    ├── PeerBusy                        the other agent of a live migration is settling it
    └── HypervisorError                 a compute host's hypervisor refused or failed
        ├── NotSupported                optional driver operation not implemented
        ├── InstanceExists
        ├── InvalidGuestState
        ├── InjectedFailure             a failure injected on purpose (fake hypervisor)
        ├── VolumeError
        │   ├── VolumeNotAttached
        │   └── VolumeAlreadyAttached
        ├── InvalidFirewallRule
        └── MigrationError              the guest still runs on the source unless stated
            ├── MigrationPreCheckError
            ├── MigrationAborted
            ├── MigrationNotConverging
            └── NoActiveMigration

Two other families stay outside it on purpose:

* ``shared_objects.runtime.messaging.exceptions.MessagingError`` (timeouts, undeliverable messages,
  ``RemoteError`` for a remote class that may not be re-created): the RPC runtime's own, so a
  caller tells "the other side answered no" (``FleetException``) from "no answer"
  (``MessagingError``).
* ``compute_agent.virt.exceptions.VirtError``: the virt driver's errors, raised and caught inside
  an agent. They never cross RPC: the agent's RPC boundary (``compute_agent/rpc_errors.py``)
  raises this module's class of the same name ``from`` them (``InstanceNotFound``,
  ``InsufficientResources``, ``HypervisorError`` and its subclasses).

Remote errors: ``ALLOWED_REMOTE_EXMODS`` is the one list of modules whose errors every Fleet
transport re-creates as their own class (the messaging runtime's always are); any other remote
error arrives as ``RemoteError``. An error is rebuilt from ``cls(*args, **kwargs)`` (oslo's
failure format sends the message as ``args[0]`` and the format values as ``kwargs``), which
``FleetException`` ensures. Agents of releases 1.0 and 1.1 still send their driver's errors
untranslated (module ``compute_agent.virt.exceptions``): ``FORMER_REMOTE_EXMODS`` tells the
codec to rebuild those from this module, by class name, without importing agent code.
"""

from __future__ import annotations

from typing import Any, ClassVar

#: The modules whose errors a Fleet transport re-creates as their own class (only this one: the
#: contract). Every ``get_transport`` of a Fleet service, tool, test or bench passes this.
ALLOWED_REMOTE_EXMODS: tuple[str, ...] = (__name__,)

#: Modules whose errors peers of older releases (1.0, 1.1) send and whose classes this module now
#: holds under the same names: the codec rebuilds them from here (``messaging/codec.py``).
FORMER_REMOTE_EXMODS: tuple[str, ...] = ("compute_agent.virt.exceptions",)


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
    # a traceback (shared_objects/runtime/messaging/server.py); subclasses inherit it.
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
    # Marks the refusal for the RPC runtime (shared_objects/runtime/messaging/authorization.py):
    # counted as outcome "forbidden", never logged there with a traceback (the audit line says it
    # all).
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


class NoValidHost(FleetException):
    """The scheduler found no host for a request; ``reasons`` says why each host was dropped."""

    msg_fmt = "No valid host was found. %(placed)s%(reasons)s"
    # An answer to the request, not a fault: logged without a traceback where it crosses RPC.
    rpc_log_level: ClassVar[str] = "warning"


class InsufficientResources(FleetException):
    """A host cannot take an instance: its claim would over-commit the host, or its hypervisor
    has not enough of a resource (kwargs then: resource, host, uuid, requested, free)."""

    msg_fmt = "Not enough resources on this host: %(reason)s"


class PeerBusy(FleetException):
    """The other agent of a live migration is driving it itself right now: leave it to that
    agent's job (``compute_agent/live_migration/resolver.py``)."""

    msg_fmt = "%(host)s is settling this live migration itself"


class HypervisorError(FleetException):
    """A compute host's hypervisor refused or failed an operation.

    Raised by an agent's RPC boundary ``from`` the driver's own error, with the driver's
    message and keyword arguments (``uuid`` names the instance when there is one).
    """

    msg_fmt = "The hypervisor failed: %(reason)s"


class NotSupported(HypervisorError):
    msg_fmt = "operation %(operation)s is not supported by this driver"


class InstanceExists(HypervisorError):
    msg_fmt = "instance %(uuid)s already exists on this hypervisor"


class InvalidGuestState(HypervisorError):
    msg_fmt = "instance %(uuid)s is %(phase)s: cannot %(action)s"


class InjectedFailure(HypervisorError):
    """A failure injected on purpose into the fake hypervisor (docs/virt.md)."""

    msg_fmt = "injected failure at step %(step)s for instance %(uuid)s"


class VolumeError(HypervisorError):
    msg_fmt = "volume error"


class VolumeNotAttached(VolumeError):
    msg_fmt = "volume %(volume_id)s is not attached to instance %(uuid)s"


class VolumeAlreadyAttached(VolumeError):
    msg_fmt = "volume %(volume_id)s or mountpoint %(mountpoint)s already in use on %(uuid)s"


class InvalidFirewallRule(HypervisorError):
    msg_fmt = "invalid firewall rule %(rule)s: %(reason)s"


class MigrationError(HypervisorError):
    """A live migration failed; unless stated otherwise the guest still runs on the source."""

    msg_fmt = "live migration of %(uuid)s failed"


class MigrationPreCheckError(MigrationError):
    msg_fmt = "live migration of %(uuid)s refused: %(reason)s"


class MigrationAborted(MigrationError):
    msg_fmt = "live migration of %(uuid)s aborted after %(rounds)s rounds"


class MigrationNotConverging(MigrationError):
    msg_fmt = (
        "live migration of %(uuid)s did not converge after %(rounds)s rounds "
        "(remaining %(remaining)s bytes)"
    )


class NoActiveMigration(MigrationError):
    msg_fmt = "instance %(uuid)s has no live migration in progress"
