"""Security hooks services plug into the generic RPC runtime.

The runtime knows nothing about logins, roles or hosts: a service that does passes

* ``RPCServer(..., authorizer=...)``: an :class:`Authorizer`, asked about every request after
  its method was found and before its arguments are deserialised;
* ``RPCClient(..., reply_from=...)``: a :data:`ReplyFrom`, telling which broker login may answer
  a call to a given target.

How a refusal is recognised
---------------------------
``Authorizer.authorize`` refuses by raising. The exception is sent back to the caller as the
failure reply, in oslo's failure format like any handler error. The server classifies it by a
duck-typed marker rather than by class (the runtime cannot import the services' exceptions):
an exception whose ``rpc_outcome`` attribute is ``"forbidden"`` (:data:`FORBIDDEN`) is a refusal,
counted as outcome ``forbidden`` in ``RPCServer.stats()`` and not logged by the server (the
authorizer writes its own audit line). Anything else raised by ``authorize`` is a bug in the
authorizer: the request is refused all the same (fail closed), counted as ``error`` and logged
with its traceback (``rpc_authorizer_failed``).
:class:`~shared_objects.runtime.messaging.exceptions.RequestRefused` carries the marker for
authorizers that have no error class of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

from shared_objects.context import RequestContext
from shared_objects.runtime.messaging.exceptions import UncoveredMethods
from shared_objects.runtime.messaging.target import Target

#: The value of ``exc.rpc_outcome`` that marks an exception as an authorisation refusal.
FORBIDDEN = "forbidden"
REFUSAL_ATTRIBUTE = "rpc_outcome"

#: Given a call's target (topic, server, ...), a predicate over the AMQP ``user_id`` of its reply
#: (``None`` when the publisher set none): True when that login may answer the call.
ReplyFrom = Callable[[Target], Callable[[str | None], bool]]


@runtime_checkable
class Authorizer(Protocol):
    """Decides whether the caller of a request may call its (namespace, method)."""

    def covers(self, namespace: str | None, method: str) -> bool:
        """True if the policy has an entry for this exposed method (checked at construction)."""
        ...

    def authorize(self, ctxt: RequestContext, namespace: str | None, method: str) -> None:
        """Return to allow; raise to refuse (mark the exception with ``rpc_outcome =
        "forbidden"``). ``ctxt.caller`` is the broker-validated login; ``ctxt.is_admin`` and
        ``ctxt.roles`` are always cleared by the server. Runs once per request: keep it cheap
        (a dictionary lookup), and do not block."""
        ...


def is_refusal(exc: BaseException) -> bool:
    """True if ``exc`` is marked as an authorisation refusal."""
    return getattr(exc, REFUSAL_ATTRIBUTE, None) == FORBIDDEN


def check_coverage(authorizer: Authorizer, exposed: Iterable[tuple[str | None, str]]) -> None:
    """Raise ``UncoveredMethods`` naming every exposed (namespace, method) the authorizer has no
    policy for: a new RPC method cannot ship without a policy entry."""
    missing = sorted(
        {(ns, m) for ns, m in exposed if not authorizer.covers(ns, m)},
        key=lambda item: (item[0] or "", item[1]),
    )
    if missing:
        raise UncoveredMethods(type(authorizer).__name__, missing)
