"""The agent's RPC boundary: every virt error leaves as the shared error of the same name.

Checked three ways: the mapper itself (class, message, kwargs, cause), an RPC call over the
in-memory transport whose handler raises a driver error (the caller gets the shared class), and
the failure an agent of release 1.0/1.1 still sends (module ``compute_agent.virt.exceptions``),
which a caller now rebuilds as the same shared class without allowing agent code.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any

import pytest

from compute_agent.rpc_errors import shared_error, virt_errors_translated
from compute_agent.virt import exceptions as virt
from shared_objects import exception
from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    MemoryBroker,
    RemoteError,
    RPCClient,
    RPCServer,
    Target,
    Transport,
    codec,
    expose,
    get_transport,
)

VIRT_ERRORS = sorted(
    (
        cls
        for _name, cls in inspect.getmembers(virt, inspect.isclass)
        if issubclass(cls, virt.VirtError) and cls.__module__ == virt.__name__
    ),
    key=lambda cls: cls.__name__,
)
# Driver errors without a shared class of their own name: the shared base stands for them.
_BY_BASE = {"VirtError", "StateFileError"}

# Keyword arguments every virt error's message format is satisfied by.
_KWARGS: dict[str, Any] = {
    "uuid": "6e0c8d47-6b4b-4cf4-9e1c-0d3c7f1b2a11",
    "operation": "power_off",
    "phase": "paused",
    "action": "resume",
    "resource": "memory_mb",
    "host": "host-b",
    "requested": 2048,
    "free": 512,
    "step": "pre_live_migration",
    "volume_id": "vol-1",
    "mountpoint": "/dev/vdb",
    "rule": "tcp 22",
    "reason": "not today",
    "rounds": 3,
    "remaining": 4096,
    "path": "/var/lib/fleet/virt.json",
}


def _expected(cls: type[virt.VirtError]) -> type[exception.FleetException]:
    name = "HypervisorError" if cls.__name__ in _BY_BASE else cls.__name__
    shared = getattr(exception, name)
    assert issubclass(shared, exception.FleetException)
    return shared  # type: ignore[no-any-return]


@pytest.mark.parametrize("cls", VIRT_ERRORS, ids=lambda cls: cls.__name__)
def test_each_virt_error_maps_to_the_shared_error_of_its_name(cls: type[virt.VirtError]) -> None:
    original = cls(**_KWARGS)
    shared = shared_error(original)
    assert type(shared) is _expected(cls)
    assert str(shared) == str(original)
    assert shared.kwargs == original.kwargs


@pytest.mark.parametrize("cls", VIRT_ERRORS, ids=lambda cls: cls.__name__)
def test_the_boundary_raises_the_shared_error_from_the_virt_error(
    cls: type[virt.VirtError],
) -> None:
    original = cls(**_KWARGS)
    with pytest.raises(exception.FleetException) as info, virt_errors_translated():
        raise original
    assert type(info.value) is _expected(cls)
    assert info.value.__cause__ is original


def test_the_boundary_lets_every_other_error_through_unchanged() -> None:
    refused = exception.InvalidRequest(reason="no")
    with pytest.raises(exception.InvalidRequest) as info, virt_errors_translated():
        raise refused
    assert info.value is refused
    with pytest.raises(KeyError), virt_errors_translated():
        raise KeyError("k")


def test_the_hypervisor_branch_mirrors_the_virt_tree() -> None:
    """A caller catching ``MigrationError`` (or ``VolumeError``) catches what the driver's
    subclasses become, as it would have caught the driver's."""
    for cls in VIRT_ERRORS:
        for base in cls.__mro__[1:]:
            if base is virt.VirtError or not issubclass(base, virt.VirtError):
                continue
            assert issubclass(_expected(cls), _expected(base)), (cls, base)


# --- over RPC ----------------------------------------------------------------------------


class _Driverish:
    """An endpoint whose handlers fail as the virt driver does."""

    target = Target(version="1.0")

    @expose
    async def precheck(self, ctxt: RequestContext, uuid: str) -> None:
        raise virt.MigrationPreCheckError(uuid=uuid, reason="already claimed on host-b")

    @expose
    async def no_guest(self, ctxt: RequestContext, uuid: str) -> None:
        raise virt.InstanceNotFound(uuid=uuid)

    @expose
    async def full(self, ctxt: RequestContext, uuid: str) -> None:
        raise virt.InsufficientResources(**_KWARGS)

    @expose
    async def refuse(self, ctxt: RequestContext) -> None:
        raise exception.InvalidRequest(reason="already yours")


def _config(user: str) -> MessagingConfig:
    return MessagingConfig(transport_url=f"memory://{user}@unit/", control_exchange="fleet-unit")


@pytest.fixture
async def transports() -> AsyncIterator[tuple[Transport, Transport]]:
    broker = MemoryBroker()
    agent = get_transport(_config("host1"), memory_broker=broker)
    caller = get_transport(
        _config("conductor"),
        allowed_remote_exmods=exception.ALLOWED_REMOTE_EXMODS,
        memory_broker=broker,
    )
    async with agent, caller:
        yield agent, caller


@pytest.mark.parametrize(
    ("method", "shared"),
    [
        ("precheck", exception.MigrationPreCheckError),
        ("no_guest", exception.InstanceNotFound),
        ("full", exception.InsufficientResources),
    ],
)
@pytest.mark.parametrize("release", ["1.2", "1.0"])
async def test_a_virt_error_in_a_handler_reaches_the_caller_as_the_shared_class(
    transports: tuple[Transport, Transport], method: str, shared: type[Exception], release: str
) -> None:
    """1.2: the agent's boundary translates. 1.0: an agent without the boundary sends the
    driver's module, which the caller (allowing only the contract) rebuilds as the same
    shared class."""
    agent_t, caller_t = transports
    boundary = virt_errors_translated if release == "1.2" else None
    server = RPCServer(
        agent_t, Target(topic="compute", server="s1"), [_Driverish()], error_boundary=boundary
    )
    async with server:
        client = RPCClient(caller_t, Target(topic="compute", server="s1"), timeout=2.0)
        with pytest.raises(exception.FleetException) as info:
            await client.call(RequestContext(), method, uuid=_KWARGS["uuid"])
    assert type(info.value) is shared
    assert _KWARGS["uuid"] in str(info.value)
    assert info.value.kwargs["uuid"] == _KWARGS["uuid"]
    # What was on the wire: the shared class (1.2) or the driver's (1.0).
    sent = info.value.remote_traceback[-1]  # type: ignore[attr-defined]
    module = "shared_objects.exception" if release == "1.2" else "compute_agent.virt.exceptions"
    assert sent.startswith(f"{module}.{shared.__name__}: "), sent


async def test_shared_errors_cross_the_boundary_as_they_are(
    transports: tuple[Transport, Transport],
) -> None:
    agent_t, caller_t = transports
    server = RPCServer(
        agent_t,
        Target(topic="compute", server="s1"),
        [_Driverish()],
        error_boundary=virt_errors_translated,
    )
    async with server:
        client = RPCClient(caller_t, Target(topic="compute", server="s1"), timeout=2.0)
        with pytest.raises(exception.InvalidRequest, match="already yours"):
            await client.call(RequestContext(), "refuse")


# --- what agents of releases 1.0 and 1.1 send ----------------------------------------------


def _old_agent_failure(exc: virt.VirtError) -> str:
    """The failure a 1.0/1.1 agent sent: the driver error as it was, untranslated."""
    failure = codec.serialize_remote_exception(exc)
    assert '"module": "compute_agent.virt.exceptions"' in failure
    return failure


@pytest.mark.parametrize(
    "cls", [c for c in VIRT_ERRORS if c.__name__ not in _BY_BASE], ids=lambda c: c.__name__
)
def test_an_old_agents_virt_error_is_rebuilt_as_the_class_the_boundary_sends(
    cls: type[virt.VirtError],
) -> None:
    original = cls(**_KWARGS)
    rebuilt = codec.deserialize_remote_exception(
        _old_agent_failure(original), exception.ALLOWED_REMOTE_EXMODS
    )
    assert type(rebuilt) is type(shared_error(original))
    assert str(rebuilt) == str(original)


@pytest.mark.parametrize("cls", [virt.VirtError, virt.StateFileError])
def test_an_old_agents_virt_error_without_a_shared_name_is_a_remote_error(
    cls: type[virt.VirtError],
) -> None:
    rebuilt = codec.deserialize_remote_exception(
        _old_agent_failure(cls(**_KWARGS)), exception.ALLOWED_REMOTE_EXMODS
    )
    assert isinstance(rebuilt, RemoteError)
    assert rebuilt.exc_type == cls.__name__


def test_a_caller_that_does_not_allow_the_contract_gets_remote_errors() -> None:
    """The former module follows the module that replaced it, never more."""
    failure = _old_agent_failure(virt.InstanceNotFound(uuid="u1"))
    assert isinstance(codec.deserialize_remote_exception(failure, []), RemoteError)
