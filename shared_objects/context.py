"""Request context: who asked, for which request, carried across every RPC hop.

On the wire it travels as ``_context_<key>`` entries of the oslo.messaging message (see
``to_dict``/``from_dict``). ``caller`` is not sent by the caller: the receiving server fills it
from the broker-validated AMQP ``user_id`` property, so a handler knows which host really sent the
request.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from typing import Any


def generate_request_id() -> str:
    """A new request id in the OpenStack form ``req-<uuid4>``."""
    return f"req-{uuid.uuid4()}"


@dataclasses.dataclass(slots=True)
class RequestContext:
    """The security and tracing context of one request."""

    request_id: str = dataclasses.field(default_factory=generate_request_id)
    global_request_id: str | None = None
    user_id: str | None = None
    project_id: str | None = None
    roles: list[str] = dataclasses.field(default_factory=list)
    is_admin: bool = False
    read_only: bool = False
    show_deleted: bool = False
    # Identity of the peer as validated by the broker; never taken from the message body.
    caller: str | None = None
    # Keys we received but do not model (e.g. from an oslo.context peer); sent back unchanged.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Service-local handle (the conductor's database access); never serialised.
    db: Any = dataclasses.field(default=None, repr=False, compare=False)
    # Service-local: the resolved caller (``shared_objects.runtime.identity.Caller``) once the
    # receiving service's authorisation has looked ``caller`` up; never serialised.
    principal: Any = dataclasses.field(default=None, repr=False, compare=False)

    _WIRE_KEYS = (
        "request_id",
        "global_request_id",
        "user_id",
        "project_id",
        "roles",
        "is_admin",
        "read_only",
        "show_deleted",
    )

    def to_dict(self) -> dict[str, Any]:
        """The wire form: oslo.context-compatible keys (``user``/``project`` aliases included)."""
        out: dict[str, Any] = dict(self.extra)
        for key in self._WIRE_KEYS:
            out[key] = getattr(self, key)
        out["user"] = self.user_id
        out["project"] = self.project_id
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, caller: str | None = None) -> RequestContext:
        """Build a context from its wire form; unknown keys are kept in ``extra``."""
        data = dict(values)
        kwargs: dict[str, Any] = {}
        for key in cls._WIRE_KEYS:
            if key in data:
                kwargs[key] = data.pop(key)
        user = data.pop("user", None)
        project = data.pop("project", None)
        kwargs.setdefault("user_id", user)
        kwargs.setdefault("project_id", project)
        if not kwargs.get("request_id"):
            kwargs["request_id"] = generate_request_id()
        roles = kwargs.get("roles")
        kwargs["roles"] = list(roles) if isinstance(roles, (list, tuple)) else []
        for flag in ("is_admin", "read_only", "show_deleted"):
            if flag in kwargs:
                kwargs[flag] = bool(kwargs[flag])
        return cls(caller=caller, extra=data, **kwargs)

    def elevated(self) -> RequestContext:
        """A copy with admin rights, for internal service-to-service work."""
        return dataclasses.replace(self, is_admin=True, roles=[*self.roles, "admin"])


def admin_context(service: str | None = None) -> RequestContext:
    """A context for work a service starts itself (periodic tasks, recovery)."""
    return RequestContext(user_id=service, is_admin=True, roles=["admin"])
