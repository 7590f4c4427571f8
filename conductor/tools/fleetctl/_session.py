"""What every ``fleetctl`` command that talks to the conductor needs: one connected session.

``fleetctl`` is an agent-like client: it has no database access of its own. Reads are remotable
object calls answered by any conductor; actions go through the compute-task API. Imported by
the commands themselves (not at start-up): it loads the RPC runtime and the objects.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import AsyncIterator

from conductor.tools.fleetctl._startup import resume_gc
from shared_objects.base import FleetObject
from shared_objects.context import RequestContext
from shared_objects.exception import ALLOWED_REMOTE_EXMODS
from shared_objects.rpc_clients.compute_task import ComputeTaskAPI
from shared_objects.rpc_clients.conductor import ConductorAPI
from shared_objects.runtime.authorizer import reply_checks
from shared_objects.runtime.config import FleetConfig
from shared_objects.runtime.identity import Identities
from shared_objects.runtime.messaging import get_transport


@dataclasses.dataclass
class Session:
    ctxt: RequestContext
    conductor: ConductorAPI
    tasks: ComputeTaskAPI


def operator_context() -> RequestContext:
    return RequestContext(user_id="fleetctl", project_id="admin", is_admin=True, roles=["admin"])


@contextlib.asynccontextmanager
async def session(args: argparse.Namespace, cfg: FleetConfig) -> AsyncIterator[Session]:
    """Connect and make object calls go to the conductor; calls wait ``args.timeout``."""
    timeout = float(getattr(args, "timeout", None) or cfg.messaging.rpc_response_timeout)
    transport = get_transport(cfg.messaging, allowed_remote_exmods=ALLOWED_REMOTE_EXMODS)
    async with transport:
        # Start-up is over (the runtime and objects are loaded): collect garbage as usual again.
        resume_gc()
        replies = reply_checks(Identities(cfg.security))
        conductor = ConductorAPI(transport, timeout=timeout, reply_from=replies)
        previous = FleetObject.indirection_api
        FleetObject.indirection_api = conductor
        try:
            tasks = ComputeTaskAPI(transport, timeout=timeout, reply_from=replies)
            yield Session(operator_context(), conductor, tasks)
        finally:
            FleetObject.indirection_api = previous
