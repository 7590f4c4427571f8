"""Errors raised by the RPC runtime, in one small hierarchy callers can catch at the right level.

The names mirror oslo.messaging's so that code ported from OpenStack reads the same; the classes
are Fleet's own. ``NoSuchMethod`` / ``UnsupportedVersion`` travel back to callers as remote
exceptions (this module is always allowed on Fleet clients, see ``codec``).
"""

from __future__ import annotations

from typing import Any


class MessagingError(Exception):
    """Base class of every error raised by ``shared_objects.runtime.messaging``.

    Subclasses keep their constructor arguments in ``args`` (so a remote peer can rebuild them
    from oslo's failure format with ``cls(*args)``) and a readable message for ``str()``.
    """

    _message: str | None = None

    def _describe(self, message: str, *ctor_args: Any) -> None:
        self._message = message
        self.args = ctor_args

    def __str__(self) -> str:
        return self._message if self._message is not None else super().__str__()


class MessagingTimeout(MessagingError, TimeoutError):
    """No reply (or no call-monitor heartbeat) arrived in time.

    Also a ``TimeoutError`` so generic timeout handling catches it.
    """

    def __init__(self, message: str, *, method: str | None = None, timeout: float | None = None):
        super().__init__(message)
        self.method = method
        self.timeout = timeout


class RemoteError(MessagingError):
    """A remote exception whose class may not be re-created locally.

    ``exc_type`` is the remote class name, ``value`` its message, ``traceback`` the remote
    traceback as a list of lines (the oslo failure format).
    """

    def __init__(
        self,
        exc_type: str | None = None,
        value: str | None = None,
        traceback: list[str] | str | None = None,
    ):
        self.exc_type = exc_type
        self.value = value
        self.traceback = traceback
        tb = "".join(traceback) if isinstance(traceback, list) else (traceback or "")
        super().__init__()
        self._describe(
            f"Remote error: {exc_type} {value}\n{tb}".rstrip(), exc_type, value, traceback
        )


class InvalidTarget(MessagingError, ValueError):
    """A target lacks what the operation needs (topic, server) or asks something impossible."""

    def __init__(self, message: str, target: Any = None):
        super().__init__()
        self._describe(f"{message}: {target}" if target is not None else message, message)
        self.target = target


class RPCVersionCapError(MessagingError):
    """The requested API version is above the client's ``version_cap``."""

    def __init__(self, version: str, version_cap: str):
        super().__init__()
        self._describe(
            f"Requested message version {version} is incompatible with the version cap "
            f"{version_cap}: the receiver may not understand it (check can_send_version first)",
            version,
            version_cap,
        )
        self.version = version
        self.version_cap = version_cap


class MessageDeliveryFailure(MessagingError):
    """The broker did not accept a message (connection lost, channel closed, nack, no route)."""


class BrokerConnectFailed(MessageDeliveryFailure):
    """The first connection to the broker failed on every host of the transport URL. The
    message is one line: the URL (password masked), the reason and what to check."""


class MessageUndeliverable(MessageDeliveryFailure):
    """A mandatory message was returned (``basic.return``, NO_ROUTE): no queue is bound for it
    right now. Raised at once for calls and casts addressed to one server (``Target.server``)
    whose ``<topic>.<server>`` queue does not exist (that server is not running), and inside the
    runtime for replies whose reply queue is gone. Nothing was enqueued."""


class MessageRejected(MessageDeliveryFailure):
    """The broker nacked the publish: a queue it routes to is full (a length limit with
    ``overflow=reject-publish``, see ``fleetctl broker setup``), or the queue could not take it.
    The message was NOT enqueued; ``exchange`` and ``routing_key`` say where it was going."""

    def __init__(self, message: str, *, exchange: str = "", routing_key: str = ""):
        super().__init__(message)
        self.exchange = exchange
        self.routing_key = routing_key


class MalformedMessage(MessagingError):
    """A received message cannot be understood (not JSON, not a dict, wrong field types)."""


class MessageTooLarge(MalformedMessage):
    """A message body is larger than ``[messaging] max_message_bytes``: refused (or, for a
    request this process would send, never sent) without being decoded."""

    def __init__(self, size: int, limit: int):
        super().__init__()
        self._describe(
            f"message of {size} bytes exceeds the limit of {limit} bytes "
            "([messaging] max_message_bytes)",
            size,
            limit,
        )
        self.size = size
        self.limit = limit


class MessageTooDeep(MalformedMessage):
    """A message nests JSON arrays/objects deeper than ``[messaging] max_message_depth`` (or is
    unbalanced): refused without being decoded."""

    def __init__(self, limit: int):
        super().__init__()
        self._describe(
            f"message nests deeper than {limit} levels ([messaging] max_message_depth)", limit
        )
        self.limit = limit


class UnsupportedEnvelopeVersion(MalformedMessage):
    """The ``oslo.version`` of a received envelope is not compatible with 2.0."""

    def __init__(self, version: Any):
        super().__init__()
        self._describe(f"Unsupported RPC envelope version {version!r} (supported: 2.0)", version)
        self.version = version
        # The inner message when it could still be parsed, so an error reply can be addressed.
        self.message: dict[str, Any] | None = None


class ExpectedException(Exception):
    """Wrap an exception a handler expects, so the server logs it at debug, not error."""

    def __init__(self, exc: BaseException):
        super().__init__(str(exc))
        self.exc = exc


class NoSuchMethod(MessagingError, AttributeError):
    """No exposed method of that name on an endpoint matching namespace and version."""

    def __init__(self, method: str):
        super().__init__()
        self._describe(f"Endpoint does not support RPC method {method}", method)
        self.method = method


class UnsupportedVersion(MessagingError):
    """No endpoint in the namespace serves a compatible version."""

    def __init__(self, version: str, method: str | None = None):
        super().__init__()
        self._describe(
            f"Endpoint does not support RPC version {version}. Attempted method: {method}",
            version,
            method,
        )
        self.version = version
        self.method = method


class Unauthenticated(MessagingError):
    """A request carried no broker-validated AMQP ``user_id``, so its sender is unknown.

    RabbitMQ checks ``user_id`` against the publisher's login only when it is present; a server
    built with ``require_user_id=True`` refuses requests without one (oslo.messaging publishers
    never set it).
    """

    def __init__(self, reason: str = "request has no broker-validated user_id"):
        super().__init__()
        self._describe(reason, reason)
        self.reason = reason


class RequestRefused(MessagingError):
    """An authorizer refused the request (a generic refusal, for authorizers without their own
    error class). ``rpc_outcome = "forbidden"`` is the marker the server classifies refusals by
    (see ``shared_objects.runtime.messaging.authorization``)."""

    rpc_outcome = "forbidden"

    def __init__(self, message: str = "request refused"):
        super().__init__()
        self._describe(message, message)


class UncoveredMethods(MessagingError, ValueError):
    """An RPC server's authorizer has no policy for some exposed methods (raised at
    construction, so a new RPC method never ships without a policy entry)."""

    def __init__(self, authorizer: str, uncovered: list[tuple[str | None, str]]):
        super().__init__()
        names = ", ".join(f"{ns}.{m}" if ns else m for ns, m in uncovered)
        self._describe(
            f"authorizer {authorizer} has no policy for exposed RPC method(s): {names}",
            authorizer,
            uncovered,
        )
        self.uncovered = uncovered
