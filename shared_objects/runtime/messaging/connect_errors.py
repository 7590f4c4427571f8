"""One line an operator can act on, for a failed connection to RabbitMQ.

aio-pika reports these as raw reprs: a refused login as ``ProbableAuthenticationError``, a
virtual host that does not exist (or on which the login has no permission) as an
``InvalidFrameError`` carrying ``<Connection.Close object at 0x…>``, because RabbitMQ answers
``Connection.Open`` with a close. ``describe_broker_failure`` turns each into a reason and the
thing to check; the URL is always shown by the caller with its password masked.
"""

from __future__ import annotations

import socket

import aiormq.exceptions

from shared_objects.runtime.tls import describe_tls_failure

__all__ = ["describe_broker_failure"]

_AUTH_ERRORS = (
    aiormq.exceptions.ProbableAuthenticationError,
    aiormq.exceptions.AuthenticationError,
)


def describe_broker_failure(exc: BaseException) -> str:
    """Why the connection failed and what to check, in one line without reprs."""
    tls = describe_tls_failure(exc)
    if tls is not None:
        return tls
    if isinstance(exc, _AUTH_ERRORS):
        return "login refused: check the user name and password of the transport URL"
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        return (
            "the broker closed the connection while opening it: the virtual host of the "
            "transport URL does not exist or the login has no permission on it (check the vhost "
            "and `rabbitmqctl list_permissions -p VHOST`)"
        )
    if isinstance(exc, TimeoutError):
        return "no answer from the broker in time: check the host and port, and the firewall"
    os_error = _os_error(exc)
    if os_error is not None:
        if isinstance(os_error, socket.gaierror):
            return "host name not found: check the host of the transport URL"
        if isinstance(os_error, ConnectionRefusedError) or os_error.errno == 111:
            return "connection refused: is RabbitMQ running and listening on that host and port?"
        return f"{os_error.strerror or os_error}: check the host and port of the transport URL"
    text = _first_line(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _os_error(exc: BaseException) -> OSError | None:
    """The socket error behind ``exc``: itself, or the ``(errno, text)`` aiormq wraps."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, aiormq.exceptions.AMQPConnectionError) and exc.args:
        first = exc.args[0]
        if isinstance(first, OSError):
            return first
        if isinstance(first, int):
            text = exc.args[1] if len(exc.args) > 1 else ""
            return OSError(first, str(text))
    cause = exc.__cause__ or exc.__context__
    return cause if isinstance(cause, OSError) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # Reprs of AMQP frames carry memory addresses that mean nothing to a reader.
    if " object at 0x" in text:
        return ""
    return text.splitlines()[0] if text else ""
