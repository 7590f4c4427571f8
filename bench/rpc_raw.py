"""The ``raw_aiopika`` path: the least an aio-pika request/reply can do, as a yardstick for Fleet.

Server: one queue, prefetch 256, ack before handling (as Fleet and oslo do), JSON in, JSON out,
reply to ``reply_to`` with the request's ``correlation_id``. Client: one exclusive auto-named reply
queue consumed with ``no_ack``, a future per ``correlation_id``. Publisher confirms stay ON for
both sides (aio-pika's default and Fleet's), so the comparison with Fleet is like for like. No
oslo envelope, no context, no serializer, no dispatch: everything Fleet does beyond that is its
overhead.

Roles: ``python bench/rpc_raw.py server --url .. --queue ..`` prints ``{"event": "ready"}`` and
serves until stdin closes; ``... client --url .. --queue .. --concurrency 1,16 --duration 2``
prints one JSON line with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from rpc_load import emit, make_payload, run_async_cell

PREFETCH = 256


def amqp_url(url: str) -> str:
    """aio-pika wants ``amqp://``; the benchmark passes oslo-style ``rabbit://`` URLs."""
    return url.replace("rabbit://", "amqp://", 1)


async def serve(url: str, queue_name: str) -> None:
    connection = await aio_pika.connect(amqp_url(url))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.declare_queue(queue_name, auto_delete=True)

        async def on_request(message: AbstractIncomingMessage) -> None:
            await message.ack()
            request = json.loads(message.body)
            body = json.dumps({"result": request["args"]["payload"]}).encode()
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    correlation_id=message.correlation_id,
                ),
                routing_key=message.reply_to or "",
            )

        await queue.consume(on_request)
        emit({"event": "ready"})
        await asyncio.to_thread(sys.stdin.read)  # serve until the orchestrator closes stdin


async def drive(
    url: str, queue_name: str, concurrencies: list[int], duration: float, server_pid: int | None
) -> None:
    connection = await aio_pika.connect(amqp_url(url))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        reply_queue = await channel.declare_queue(exclusive=True)
        waiting: dict[str, asyncio.Future[Any]] = {}

        async def on_reply(message: AbstractIncomingMessage) -> None:
            future = waiting.pop(message.correlation_id or "", None)
            if future is not None and not future.done():
                future.set_result(json.loads(message.body)["result"])

        await reply_queue.consume(on_reply, no_ack=True)
        body = json.dumps({"method": "echo", "args": {"payload": make_payload()}}).encode()
        loop = asyncio.get_running_loop()

        async def call() -> Any:
            correlation_id = uuid.uuid4().hex
            future = loop.create_future()
            waiting[correlation_id] = future
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    correlation_id=correlation_id,
                    reply_to=reply_queue.name,
                ),
                routing_key=queue_name,
            )
            return await asyncio.wait_for(future, 30)

        results = {
            str(c): await run_async_cell(call, c, duration, server_pid) for c in concurrencies
        }
        emit({"event": "result", "results": results})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--concurrency", default="1,16,128")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--server-pid", type=int, default=None, help="for CPU accounting")
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    if args.role == "server":
        coro = serve(args.url, args.queue)
    else:
        concurrencies = [int(c) for c in args.concurrency.split(",")]
        coro = drive(args.url, args.queue, concurrencies, args.duration, args.server_pid)
    if args.uvloop:
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
