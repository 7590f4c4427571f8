"""A conductor-like RPC server in its own process, for the message-limit fault test.

Object-like handlers behind Fleet's versioned-object serializer, as the conductor has. Its
memory is measured from outside (``/proc/<pid>/status``); it measures its own event-loop lag (a
ticker every 5 ms: how late each tick is) and reports it on request.

``python rpc_limits_server.py --url .. --exchange .. --topic ..`` prints ``{"event": "ready"}``
once consuming; on stdin, ``{"op": "stats", "id": n}`` answers ``{"id": n, "max_lag_ms": ..,
"dropped": {..}, "calls": {..}}`` and resets the lag maximum; closing stdin stops it.
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
from shared_objects.serializer import FleetObjectSerializer

TICK = 0.005


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class ObjectEndpoint:
    """Shaped like the conductor's object calls: a remotable-like method with arguments."""

    @expose
    async def object_action(
        self, ctxt: RequestContext, objname: str, objmethod: str, args: Any = None
    ) -> dict[str, Any]:
        return {"objname": objname, "objmethod": objmethod, "args": args}


class LagMeter:
    def __init__(self) -> None:
        self.max_lag = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            planned = loop.time() + TICK
            await asyncio.sleep(TICK)
            self.max_lag = max(self.max_lag, loop.time() - planned)


async def serve(args: argparse.Namespace) -> None:
    config = MessagingConfig(transport_url=args.url, control_exchange=args.exchange)
    meter = LagMeter()
    ticker = asyncio.create_task(meter.run())
    async with get_transport(config) as transport:
        target = Target(topic=args.topic, server="c1")
        server = RPCServer(
            transport, target, [ObjectEndpoint()], serializer=FleetObjectSerializer()
        )
        async with server:
            emit({"event": "ready", "pid": os.getpid()})
            reader = asyncio.StreamReader()
            loop = asyncio.get_running_loop()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
            while line := await reader.readline():
                command = json.loads(line)
                if command.get("op") == "stats":
                    stats = server.stats()
                    emit(
                        {
                            "id": command.get("id"),
                            "max_lag_ms": round(meter.max_lag * 1000, 1),
                            "dropped": stats["dropped"],
                            "calls": stats["calls"],
                        }
                    )
                    meter.max_lag = 0.0
    ticker.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--topic", required=True)
    args = parser.parse_args()
    configure_logging(fmt="json", level="warning")  # stdout is the protocol; logs to stderr
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
