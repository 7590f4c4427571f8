"""The async hook that turns RPC arguments and results into JSON primitives and back."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from shared_objects.context import RequestContext


@runtime_checkable
class Serializer(Protocol):
    """Maps entities (e.g. versioned objects) to primitives for the wire and back."""

    async def serialize_entity(self, ctxt: RequestContext, entity: Any) -> Any: ...

    async def deserialize_entity(self, ctxt: RequestContext, primitive: Any) -> Any: ...


class NoOpSerializer:
    """Passes values through unchanged: arguments must already be JSON-friendly."""

    async def serialize_entity(self, ctxt: RequestContext, entity: Any) -> Any:
        return entity

    async def deserialize_entity(self, ctxt: RequestContext, primitive: Any) -> Any:
        return primitive
