"""What the broker lets a login do: run one operation on a fresh channel and name the outcome.

The broker answers a refused operation by closing the channel with a reply code; the
permission tests compare those codes, so the probe turns each into its AMQP name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aio_pika
import aiormq

#: One operation on a channel (declare, bind, publish, consume, ...).
ChannelOp = Callable[[aio_pika.abc.AbstractChannel], Awaitable[object]]

_REFUSALS: tuple[tuple[type[Exception], str], ...] = (
    (aiormq.exceptions.ChannelAccessRefused, "ACCESS_REFUSED"),
    (aiormq.exceptions.ChannelPreconditionFailed, "PRECONDITION_FAILED"),
    (aiormq.exceptions.ChannelLockedResource, "RESOURCE_LOCKED"),
)


async def channel_outcome(connection: aio_pika.abc.AbstractConnection, op: ChannelOp) -> str:
    """'ok', or the reply code's name when the broker closed the channel on ``op``."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        await op(channel)
    except tuple(cls for cls, _ in _REFUSALS) as exc:
        return next(name for cls, name in _REFUSALS if isinstance(exc, cls))
    finally:
        if not channel.is_closed:
            await channel.close()
    return "ok"


async def ignore_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """A consumer callback for tests that only need a consumer to exist."""
