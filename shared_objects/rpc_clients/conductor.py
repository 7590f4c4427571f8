"""Client of the conductor: the indirection API agents install as ``FleetObject.indirection_api``.

Every remotable call on an agent becomes one RPC ``call`` to topic ``conductor`` (any conductor
replica may answer). Arguments and results go through ``FleetObjectSerializer``, so objects
travel as versioned primitives and come back at the versions this process knows. The servers
(``conductor.indirection``, ``conductor.liveness``) take their targets from the constants here.
"""

from __future__ import annotations

from typing import Any

from shared_objects.base import FleetObject, IndirectionAPI
from shared_objects.runtime.messaging import RPCClient, Target, Transport
from shared_objects.runtime.messaging.authorization import ReplyFrom
from shared_objects.serializer import FleetObjectSerializer

TOPIC = "conductor"
# Conductor API (namespace None) history:
# 1.0: Initial version: object_class_action_versions, object_action, object_backport_versions.
# 1.1: report_alive (conductor/liveness.py): a beat that carries nothing, the host being the
#      caller's login.
API_VERSION = "1.1"
OBJECT_API_VERSION = "1.0"
# The conductor API version that has ``report_alive``.
REPORT_ALIVE_VERSION = "1.1"
# ``ping``, served by every conductor (``conductor.indirection.BaseAPIEndpoint``).
BASEAPI_NAMESPACE = "baseapi"
BASEAPI_VERSION = "1.0"


class ConductorAPI(IndirectionAPI):
    """Object indirection over RPC (``object_class_action_versions``, ``object_action``,
    ``object_backport_versions``) plus ``ping``."""

    def __init__(
        self,
        transport: Transport,
        *,
        topic: str = TOPIC,
        timeout: float | None = None,
        serializer: FleetObjectSerializer | None = None,
        reply_from: ReplyFrom | None = None,
    ) -> None:
        """``reply_from``: which logins may answer (a conductor's; see
        ``shared_objects.runtime.authorizer.reply_checks``); None accepts any (tests, tools)."""
        self.serializer = serializer if serializer is not None else FleetObjectSerializer()
        if self.serializer.indirection_api is None:
            # Objects too new for us are sent back to the conductor for a backport.
            self.serializer.indirection_api = self
        self.client = RPCClient(
            transport,
            # Object calls ask for 1.0, which every conductor serves; newer methods prepare
            # their own version (a conductor of the previous release refuses what it lacks).
            Target(topic=topic, version=OBJECT_API_VERSION),
            serializer=self.serializer,
            timeout=timeout,
            reply_from=reply_from,
        )
        self._base_client = RPCClient(
            transport,
            Target(topic=topic, namespace=BASEAPI_NAMESPACE, version=BASEAPI_VERSION),
            timeout=timeout,
            reply_from=reply_from,
        )

    async def object_class_action_versions(
        self,
        context: Any,
        objname: str,
        objmethod: str,
        object_versions: dict[str, str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        return await self.client.call(
            context,
            "object_class_action_versions",
            objname=objname,
            objmethod=objmethod,
            object_versions=object_versions,
            args=list(args),
            kwargs=kwargs,
        )

    async def object_action(
        self,
        context: Any,
        objinst: FleetObject,
        objmethod: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[dict[str, Any], Any]:
        reply = await self.client.call(
            context,
            "object_action",
            objinst=objinst,
            objmethod=objmethod,
            args=list(args),
            kwargs=kwargs,
        )
        updates, result = reply
        return updates, result

    async def object_backport_versions(
        self, context: Any, objinst: Any, object_versions: dict[str, str]
    ) -> Any:
        return await self.client.call(
            context,
            "object_backport_versions",
            objinst=objinst,
            object_versions=object_versions,
        )

    async def report_alive(self, context: Any) -> dict[str, Any]:
        """Mark this agent's host alive (the host is the broker login, nothing is sent);
        its row's ``disabled`` and ``forced_down``. Needs conductors of release 1.2 or later
        (``UnsupportedVersion`` from older ones); ``ServiceNotFound`` when the row is gone."""
        result: dict[str, Any] = await self.client.prepare(version=REPORT_ALIVE_VERSION).call(
            context, "report_alive"
        )
        return result

    async def report_alive_cast(self, context: Any) -> None:
        """``report_alive`` without waiting for an answer (the beats between two answered
        ones: no reply to publish, confirm and route back, for the conductor or the agent)."""
        await self.client.prepare(version=REPORT_ALIVE_VERSION).cast(context, "report_alive")

    async def ping(self, context: Any, arg: Any = None, *, wait: float | None = None) -> Any:
        """Round trip to any conductor (waiting at most ``wait`` seconds); returns ``arg``."""
        cctx = self._base_client.prepare(timeout=wait) if wait else self._base_client
        return await cctx.call(context, "ping", arg=arg)
