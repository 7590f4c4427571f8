"""The ``fleet`` path: Fleet's RPCClient and RPCServer with their default options.

Default ``MessagingConfig`` (publisher confirms on, prefetch 64, max_concurrency 64), oslo wire
format, a ``RequestContext`` per call, the no-op serializer. One ``echo`` method returning its
payload. ``--no-confirms`` (the optional ``fleet_noconfirms`` path of ``rpc.py``) turns publisher
confirms off on both sides, to measure what they cost.

Roles as in ``rpc_raw.py``: ``server`` prints ``{"event": "ready"}`` and serves until stdin closes;
``client`` prints one JSON result line.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from rpc_load import emit, make_payload, run_async_cell

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.log import configure_logging
from shared_objects.runtime.messaging import RPCClient, RPCServer, Target, expose, get_transport


class Endpoint:
    """The benchmark's one method: return the payload."""

    @expose
    async def echo(self, ctxt: RequestContext, payload: Any) -> Any:
        return payload


def config_for(url: str, exchange: str, confirms: bool = True) -> MessagingConfig:
    return MessagingConfig(
        transport_url=url, control_exchange=exchange, publisher_confirms=confirms
    )


async def serve(url: str, exchange: str, topic: str, confirms: bool) -> None:
    async with get_transport(config_for(url, exchange, confirms)) as transport:
        server = RPCServer(transport, Target(topic=topic, server="bench"), [Endpoint()])
        async with server:
            emit({"event": "ready"})
            await asyncio.to_thread(sys.stdin.read)  # serve until the orchestrator closes stdin


async def drive(
    url: str,
    exchange: str,
    topic: str,
    concurrencies: list[int],
    duration: float,
    server_pid: int | None,
    confirms: bool,
) -> None:
    async with get_transport(config_for(url, exchange, confirms)) as transport:
        client = RPCClient(transport, Target(topic=topic), timeout=30)
        payload = make_payload()

        async def call() -> Any:
            ctxt = RequestContext(user_id="bench", project_id="bench")
            return await client.call(ctxt, "echo", payload=payload)

        await call()  # creates the reply queue before the clock starts
        results = {
            str(c): await run_async_cell(call, c, duration, server_pid) for c in concurrencies
        }
        emit({"event": "result", "results": results})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--concurrency", default="1,16,128")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--server-pid", type=int, default=None, help="for CPU accounting")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument(
        "--no-confirms", action="store_true", help="publisher_confirms=False on both sides"
    )
    args = parser.parse_args()
    # stdout carries the protocol; logs go to stderr, and only warnings (no per-call cost).
    configure_logging(fmt="json", level="warning")
    if args.role == "server":
        coro = serve(args.url, args.exchange, args.topic, not args.no_confirms)
    else:
        concurrencies = [int(c) for c in args.concurrency.split(",")]
        coro = drive(
            args.url,
            args.exchange,
            args.topic,
            concurrencies,
            args.duration,
            args.server_pid,
            not args.no_confirms,
        )
    if args.uvloop:
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
