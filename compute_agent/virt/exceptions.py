"""Errors raised by virt drivers, in one small hierarchy the agent catches at the right level.

They are the agent's own and never cross RPC: the agent's RPC boundary
(``compute_agent/rpc_errors.py``) raises the shared error of the same name
(``shared_objects.exception.HypervisorError`` and its subclasses, ``InstanceNotFound``,
``InsufficientResources``) ``from`` them, with the same message and ``kwargs``, so no caller
imports this module. Every error keeps the keyword arguments it was built from in ``kwargs``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class VirtError(Exception):
    """Base of every virt driver error."""

    msg_fmt: ClassVar[str] = "virt driver error"

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        self.kwargs: dict[str, Any] = kwargs
        if message is None:
            try:
                message = self.msg_fmt % kwargs
            except (KeyError, TypeError, ValueError):
                # A format/kwargs mismatch must not hide the original failure.
                message = f"{self.msg_fmt} {kwargs!r}"
        self.message = message
        super().__init__(message)

    @property
    def uuid(self) -> str | None:
        """The instance the error is about, when there is one."""
        value = self.kwargs.get("uuid")
        return None if value is None else str(value)


class NotSupported(VirtError):
    """The driver does not implement an optional operation."""

    msg_fmt = "operation %(operation)s is not supported by this driver"


class InstanceNotFound(VirtError):
    """The hypervisor has no guest with this UUID."""

    msg_fmt = "instance %(uuid)s not found on this hypervisor"


class InstanceExists(VirtError):
    """A guest with this UUID already exists on this hypervisor."""

    msg_fmt = "instance %(uuid)s already exists on this hypervisor"


class InvalidGuestState(VirtError):
    """The guest is in a phase that does not allow the requested action."""

    msg_fmt = "instance %(uuid)s is %(phase)s: cannot %(action)s"


class InsufficientResources(VirtError):
    """The hypervisor does not have enough of a resource for a new or incoming guest."""

    msg_fmt = (
        "not enough %(resource)s on %(host)s for instance %(uuid)s: "
        "requested %(requested)s, free %(free)s"
    )


class InjectedFailure(VirtError):
    """A failure injected on purpose (test hook or FLEET_FAKE_FAILURES) at a named step."""

    msg_fmt = "injected failure at step %(step)s for instance %(uuid)s"

    @property
    def step(self) -> str:
        """The driver step the failure was injected at."""
        return str(self.kwargs.get("step"))


class VolumeError(VirtError):
    """Base of volume attach/detach errors."""

    msg_fmt = "volume error"


class VolumeNotAttached(VolumeError):
    """The volume is not attached to this guest."""

    msg_fmt = "volume %(volume_id)s is not attached to instance %(uuid)s"


class VolumeAlreadyAttached(VolumeError):
    """The volume, or another volume at the same mountpoint, is already attached."""

    msg_fmt = "volume %(volume_id)s or mountpoint %(mountpoint)s already in use on %(uuid)s"


class InvalidFirewallRule(VirtError):
    """A security-group rule the firewall cannot apply."""

    msg_fmt = "invalid firewall rule %(rule)s: %(reason)s"


class MigrationError(VirtError):
    """Base of live-migration errors. Unless stated otherwise the guest still runs on the source."""

    msg_fmt = "live migration of %(uuid)s failed"


class MigrationPreCheckError(MigrationError):
    """A check_can_live_migrate_* step refused the migration."""

    msg_fmt = "live migration of %(uuid)s refused: %(reason)s"


class MigrationAborted(MigrationError):
    """live_migration_abort (or destroy) stopped the copy; the guest still runs on the source."""

    msg_fmt = "live migration of %(uuid)s aborted after %(rounds)s rounds"


class MigrationNotConverging(MigrationError):
    """The guest dirtied memory faster than it could be copied and the policy is to give up."""

    msg_fmt = (
        "live migration of %(uuid)s did not converge after %(rounds)s rounds "
        "(remaining %(remaining)s bytes)"
    )


class NoActiveMigration(MigrationError):
    """abort/force-complete asked for a guest that has no copy in progress (or already switched)."""

    msg_fmt = "instance %(uuid)s has no live migration in progress"


class StateFileError(VirtError):
    """The fake hypervisor's persisted state cannot be read; refusing to start with guests lost."""

    msg_fmt = "cannot load hypervisor state from %(path)s: %(reason)s"
