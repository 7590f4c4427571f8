"""What every ``fleetctl`` command that talks to the conductor needs: one connected session.

``fleetctl`` is an agent-like client: it has no database access of its own. Reads are remotable
object calls answered by any conductor; actions go through the compute-task API.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid as uuidlib
from collections.abc import AsyncIterator

from shared_objects.authorizer import reply_checks
from shared_objects.base import FleetObject
from shared_objects.config import FleetConfig
from shared_objects.context import RequestContext
from shared_objects.identity import Identities
from shared_objects.messaging import get_transport
from shared_objects.rpc_clients.compute_task import ComputeTaskAPI
from shared_objects.rpc_clients.conductor import ConductorAPI

ALLOWED_REMOTE_EXMODS = ["shared_objects.exception", "compute_agent.virt.exceptions"]


class CommandError(Exception):
    """A failure to report as one line on stderr with exit status 1."""


@dataclasses.dataclass
class Session:
    ctxt: RequestContext
    conductor: ConductorAPI
    tasks: ComputeTaskAPI


def operator_context() -> RequestContext:
    return RequestContext(user_id="fleetctl", project_id="admin", is_admin=True, roles=["admin"])


def check_uuid(value: str) -> str:
    """The canonical form of ``value``, or a ``CommandError`` naming it."""
    try:
        return str(uuidlib.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise CommandError(f"{value!r} is not a valid UUID") from None


@contextlib.asynccontextmanager
async def session(cfg: FleetConfig, *, timeout: float = 30.0) -> AsyncIterator[Session]:
    """Connect, make object calls go to the conductor, and check one answers."""
    transport = get_transport(cfg.messaging, allowed_remote_exmods=ALLOWED_REMOTE_EXMODS)
    async with transport:
        replies = reply_checks(Identities(cfg.security))
        conductor = ConductorAPI(transport, timeout=timeout, reply_from=replies)
        previous = FleetObject.indirection_api
        FleetObject.indirection_api = conductor
        try:
            tasks = ComputeTaskAPI(transport, timeout=timeout, reply_from=replies)
            yield Session(operator_context(), conductor, tasks)
        finally:
            FleetObject.indirection_api = previous
