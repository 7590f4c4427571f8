"""A Fleet RPCServer in its own process, so a fault test can SIGKILL it like a crashed host.

``python fleet_server.py --url .. --exchange .. --topic .. --server ..`` prints
``{"event": "ready"}`` once consuming, ``{"event": "handled", "i": ..}`` after each ``echo``, and
serves until stdin is closed (or ``--max-seconds`` pass).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.log import configure_logging
from shared_objects.runtime.messaging import RPCServer, Target, expose, get_transport


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class Endpoint:
    """``echo`` returns its argument after an optional delay (to have calls in flight)."""

    def __init__(self, server: str) -> None:
        self.server = server

    @expose
    async def echo(self, ctxt: RequestContext, i: int, delay: float = 0.0) -> dict[str, Any]:
        if delay:
            await asyncio.sleep(delay)
        emit({"event": "handled", "i": i})
        return {"i": i, "server": self.server}


async def serve(args: argparse.Namespace) -> None:
    config = MessagingConfig(transport_url=args.url, control_exchange=args.exchange)
    async with get_transport(config) as transport:
        target = Target(topic=args.topic, server=args.server)
        async with RPCServer(transport, target, [Endpoint(args.server)]):
            emit({"event": "ready"})
            stdin_closed = asyncio.create_task(asyncio.to_thread(sys.stdin.read))
            await asyncio.wait([stdin_closed], timeout=args.max_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--server", default="victim")
    parser.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args()
    configure_logging(fmt="json", level="warning")  # stdout is the protocol; logs to stderr
    asyncio.run(serve(args))
    sys.stdout.flush()
    # The stdin reader thread may still block; it must not keep the process alive.
    os._exit(0)


if __name__ == "__main__":
    main()
