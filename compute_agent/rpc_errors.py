"""The agent's RPC boundary for errors: virt driver errors leave as the shared contract's.

The driver's errors (``compute_agent.virt.exceptions``) are the agent's own business; a caller
(the conductor, an operator's tool, the other agent of a live migration) knows only the shared
tree (``shared_objects.exception``). The agent's RPC server enters ``virt_errors_translated``
around every handler call (``RPCServer(error_boundary=...)``), which raises the shared error of
the same name ``from`` the driver's, with its message and keyword arguments: callers never import
agent code, and their ``allowed_remote_exmods`` list only the contract.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from compute_agent.virt import exceptions as virt
from shared_objects import exception

# Each driver error and the shared error a caller gets for it. A subclass missing here leaves as
# its nearest listed base (``StateFileError``, raised only at start, as ``HypervisorError``).
_SHARED: dict[type[virt.VirtError], type[exception.FleetException]] = {
    virt.VirtError: exception.HypervisorError,
    virt.NotSupported: exception.NotSupported,
    virt.InstanceNotFound: exception.InstanceNotFound,
    virt.InstanceExists: exception.InstanceExists,
    virt.InvalidGuestState: exception.InvalidGuestState,
    virt.InsufficientResources: exception.InsufficientResources,
    virt.InjectedFailure: exception.InjectedFailure,
    virt.VolumeError: exception.VolumeError,
    virt.VolumeNotAttached: exception.VolumeNotAttached,
    virt.VolumeAlreadyAttached: exception.VolumeAlreadyAttached,
    virt.InvalidFirewallRule: exception.InvalidFirewallRule,
    virt.MigrationError: exception.MigrationError,
    virt.MigrationPreCheckError: exception.MigrationPreCheckError,
    virt.MigrationAborted: exception.MigrationAborted,
    virt.MigrationNotConverging: exception.MigrationNotConverging,
    virt.NoActiveMigration: exception.NoActiveMigration,
}


def shared_error(exc: virt.VirtError) -> exception.FleetException:
    """The shared error a caller gets for the driver error ``exc`` (same message and kwargs)."""
    for cls in type(exc).__mro__:
        shared = _SHARED.get(cls)
        if shared is not None:
            return shared(exc.message, **exc.kwargs)
    raise AssertionError(f"{type(exc).__name__} is not a VirtError")  # pragma: no cover


@contextlib.contextmanager
def virt_errors_translated() -> Iterator[None]:
    """Raise the shared error ``from`` any virt error escaping the block."""
    try:
        yield
    except virt.VirtError as exc:
        raise shared_error(exc) from exc
