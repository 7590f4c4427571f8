"""What the security tests forge as a hostile peer would: a reply published by a login that
should not answer, and the reply checks a caller makes that name who may.

Used by the runtime's security tests on the in-memory transport and on RabbitMQ alike.
"""

from __future__ import annotations

from typing import Any

from shared_objects.runtime.messaging import codec, ids
from shared_objects.runtime.messaging.authorization import ReplyFrom
from shared_objects.runtime.messaging.target import Target


def reply_body(msg_id: str, result: Any, *, ending: bool = True) -> bytes:
    """The body of a reply to ``msg_id`` carrying ``result``, as the runtime encodes one."""
    return codec.encode_message(
        {
            "result": result,
            "failure": None,
            "ending": ending,
            "_msg_id": msg_id,
            "_unique_id": ids.new_id(),
        }
    )


def replies_only_from(*logins: str) -> ReplyFrom:
    """Reply checks (``RPCClient(reply_from=...)``) accepting replies from ``logins`` only,
    whatever the target."""

    def reply_from(target: Target) -> Any:
        return lambda login: login in logins

    return reply_from
