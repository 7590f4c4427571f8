"""The ``oslo`` path: oslo.messaging 18.x RPCClient and RPCServer, as OpenStack runs them.

Threading executor (the default since eventlet's deprecation), default options (publisher
confirms, ``rabbit_qos_prefetch_count`` 0), one transport per process on the global ``cfg.CONF``
(a private ``ConfigOpts`` breaks 18.3's tracing options). The client runs ``c`` threads calling
``echo`` in a closed loop.

Roles as in ``rpc_raw.py``: ``server`` prints ``{"event": "ready"}`` and serves until stdin closes;
``client`` prints one JSON result line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Any

# oslo.messaging imports eventlet (through oslo.service), which warns on import.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
warnings.filterwarnings("ignore", category=DeprecationWarning)

import oslo_messaging  # noqa: E402
from oslo_config import cfg  # noqa: E402
from rpc_load import emit, make_payload, run_thread_cell  # noqa: E402


class Endpoint:
    """The benchmark's one method: return the payload."""

    def echo(self, ctxt: Any, payload: Any) -> Any:
        return payload


def transport_for(url: str, exchange: str) -> Any:
    oslo_messaging.set_transport_defaults(control_exchange=exchange)
    cfg.CONF([], project="fleet-bench", default_config_files=[], default_config_dirs=[])
    return oslo_messaging.get_rpc_transport(cfg.CONF, url=url)


def serve(url: str, exchange: str, topic: str) -> None:
    transport = transport_for(url, exchange)
    server = oslo_messaging.get_rpc_server(
        transport,
        oslo_messaging.Target(topic=topic, server="bench"),
        [Endpoint()],
        executor="threading",
        access_policy=oslo_messaging.DefaultRPCAccessPolicy,
    )
    server.start()
    emit({"event": "ready"})
    sys.stdin.read()  # serve until the orchestrator closes stdin
    server.stop()
    server.wait()
    transport.cleanup()


def drive(
    url: str,
    exchange: str,
    topic: str,
    concurrencies: list[int],
    duration: float,
    server_pid: int | None,
) -> None:
    transport = transport_for(url, exchange)
    client = oslo_messaging.get_rpc_client(
        transport, oslo_messaging.Target(topic=topic), timeout=30
    )
    payload = make_payload()
    context = {"user": "bench", "request_id": "req-bench"}

    def call() -> Any:
        return client.call(context, "echo", payload=payload)

    call()  # creates the reply queue before the clock starts
    results = {str(c): run_thread_cell(call, c, duration, server_pid) for c in concurrencies}
    emit({"event": "result", "results": results})
    transport.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--concurrency", default="1,16,128")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--server-pid", type=int, default=None, help="for CPU accounting")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    # At c=128 oslo warns about "call queues" growing; that is the load, not a leak.
    logging.getLogger("oslo_messaging").setLevel(logging.ERROR)
    if args.role == "server":
        serve(args.url, args.exchange, args.topic)
    else:
        concurrencies = [int(c) for c in args.concurrency.split(",")]
        drive(args.url, args.exchange, args.topic, concurrencies, args.duration, args.server_pid)
    sys.stdout.flush()
    # oslo leaves non-daemon threads (heartbeat, executor) behind; do not wait for them.
    os._exit(0)


if __name__ == "__main__":
    main()
