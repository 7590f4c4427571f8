"""A real oslo.messaging peer for the interop tests, run in its own process with its own transport.

Modes (first argument):

``server``   one oslo ``RPCServer`` per name in ``--servers`` on ``--topic``; every endpoint call is
             reported on stdout as ``{"event": "received", ...}``.
``client``   an oslo ``RPCClient`` driven by JSON commands on stdin, one per line::

                 {"id": 1, "op": "call", "method": "echo", "args": {...}, "server": "s1",
                  "timeout": 10, "call_monitor_timeout": 2, "ctxt": {...}}
                 {"id": 2, "op": "cast", "method": "note", "args": {...}, "fanout": true}
                 {"id": 3, "op": "burst", "method": "echo", "count": 300, "threads": 16}

             and answering ``{"id": 1, "ok": true, "result": ...}`` or ``{"id": 1, "ok": false,
             "exc_class": ..., "exc_module": ..., "mro": [...], "message": ...}``.
``listener`` an oslo notification listener (messagingv2) on ``--topic``; every notification is
             reported as ``{"event": "notification", ...}``.

Every mode prints ``{"event": "ready"}`` once it is serving, exits when stdin is closed or after
``--max-seconds``, and writes only JSON lines to stdout (logs go to stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import warnings
from typing import Any

# oslo.messaging imports eventlet (through oslo.service), which warns on import; the peer has
# nothing to do with eventlet, so keep its stderr readable.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
warnings.filterwarnings("ignore", category=DeprecationWarning)

import interop_errors  # noqa: E402  (this script's own directory is sys.path[0])
import oslo_messaging  # noqa: E402
from oslo_config import cfg  # noqa: E402

_stdout_lock = threading.Lock()


def emit(message: dict[str, Any]) -> None:
    """Write one JSON line to stdout (thread-safe: oslo runs endpoints in worker threads)."""
    line = json.dumps(message, default=repr)
    with _stdout_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def make_transport(args: argparse.Namespace) -> Any:
    """An oslo RPC transport on the global ``cfg.CONF`` (oslo 18.3 needs the global one)."""
    oslo_messaging.set_transport_defaults(control_exchange=args.exchange)
    cfg.CONF([], project="fleet-interop", default_config_files=[], default_config_dirs=[])
    # Topology options (durable / quorum queues...) must be set before the driver is created.
    from oslo_messaging._drivers import amqp, impl_rabbit

    cfg.CONF.register_opts(amqp.amqp_opts, group="oslo_messaging_rabbit")
    cfg.CONF.register_opts(impl_rabbit.rabbit_opts, group="oslo_messaging_rabbit")
    for item in args.rabbit_opt:
        name, _, value = item.partition("=")
        parsed: Any = {"true": True, "false": False}.get(value.lower(), value)
        cfg.CONF.set_override(name, parsed, group="oslo_messaging_rabbit")
    allowed = [m for m in args.allowed_exmods.split(",") if m]
    return oslo_messaging.get_rpc_transport(cfg.CONF, url=args.url, allowed_remote_exmods=allowed)


class Endpoint:
    """What a Fleet client calls on the oslo server."""

    target = oslo_messaging.Target(version="1.3")

    def __init__(self, server: str) -> None:
        self.server = server

    def _report(self, method: str, ctxt: Any, kwargs: dict[str, Any]) -> None:
        emit(
            {
                "event": "received",
                "server": self.server,
                "method": method,
                "args": kwargs,
                "ctxt": ctxt,
            }
        )

    def echo(self, ctxt: Any, **kwargs: Any) -> dict[str, Any]:
        self._report("echo", ctxt, kwargs)
        return {"args": kwargs, "server": self.server, "ctxt": ctxt}

    def note(self, ctxt: Any, **kwargs: Any) -> None:
        self._report("note", ctxt, kwargs)

    def slow(self, ctxt: Any, delay: float) -> str:
        self._report("slow", ctxt, {"delay": delay})
        time.sleep(delay)
        return f"slept {delay}"

    def fail_value(self, ctxt: Any, message: str) -> None:
        self._report("fail_value", ctxt, {"message": message})
        raise ValueError(message)

    def fail_custom(self, ctxt: Any, message: str) -> None:
        self._report("fail_custom", ctxt, {"message": message})
        raise interop_errors.InteropError(message, code=42)


class NotificationEndpoint:
    """Reports every notification the oslo listener receives."""

    def _report(
        self,
        priority: str,
        ctxt: Any,
        publisher_id: str,
        event_type: str,
        payload: Any,
        metadata: Any,
    ) -> None:
        emit(
            {
                "event": "notification",
                "priority": priority,
                "publisher_id": publisher_id,
                "event_type": event_type,
                "payload": payload,
                "ctxt": ctxt,
                "metadata": metadata,
            }
        )

    def info(
        self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any
    ) -> None:
        self._report("info", ctxt, publisher_id, event_type, payload, metadata)

    def warn(
        self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any
    ) -> None:
        self._report("warn", ctxt, publisher_id, event_type, payload, metadata)

    def error(
        self, ctxt: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any
    ) -> None:
        self._report("error", ctxt, publisher_id, event_type, payload, metadata)


def describe_exception(exc: BaseException) -> dict[str, Any]:
    """What the test needs to know about an exception the oslo client raised."""
    return {
        "ok": False,
        "exc_class": type(exc).__name__,
        "exc_module": type(exc).__module__,
        "mro": [f"{k.__module__}.{k.__name__}" for k in type(exc).__mro__],
        "message": str(exc),
        "exc_type": getattr(exc, "exc_type", None),
        "kwargs": getattr(exc, "kwargs", None),
    }


def burst(prepared: Any, ctxt: Any, method: str, count: int, threads: int) -> dict[str, Any]:
    """``count`` calls ``method(i=i)`` from ``threads`` threads; which results came back right."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> bool:
        return bool(prepared.call(ctxt, method, i=i)["args"] == {"i": i})

    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(one, range(count)))
    return {"ok": True, "correct": sum(outcomes), "count": count}


def run_client(args: argparse.Namespace, transport: Any) -> None:
    target = oslo_messaging.Target(topic=args.topic, version="1.0")
    client = oslo_messaging.get_rpc_client(transport, target, timeout=10)
    emit({"event": "ready"})
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        if command["op"] == "stop":
            break
        prepared = client.prepare(
            server=command.get("server"),
            fanout=command.get("fanout", False),
            timeout=command.get("timeout", 10),
            version=command.get("version", "1.0"),
            call_monitor_timeout=command.get("call_monitor_timeout"),
        )
        ctxt = command.get("ctxt", {})
        started = time.monotonic()
        try:
            if command["op"] == "call":
                result = prepared.call(ctxt, command["method"], **command.get("args", {}))
                reply: dict[str, Any] = {"ok": True, "result": result}
            elif command["op"] == "burst":
                reply = burst(
                    prepared, ctxt, command["method"], command["count"], command["threads"]
                )
            else:
                prepared.cast(ctxt, command["method"], **command.get("args", {}))
                reply = {"ok": True, "result": None}
        except Exception as exc:  # reported to the test, which asserts on the class
            reply = describe_exception(exc)
        reply["id"] = command["id"]
        reply["elapsed"] = time.monotonic() - started
        emit(reply)


def wait_for_stdin_close(max_seconds: float) -> None:
    """Block until the test closes our stdin (or sends ``stop``), at most ``max_seconds``."""
    done = threading.Event()

    def watch() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        done.set()

    threading.Thread(target=watch, daemon=True).start()
    done.wait(max_seconds)


def run_server(args: argparse.Namespace, transport: Any) -> None:
    servers = []
    for name in args.servers.split(","):
        target = oslo_messaging.Target(topic=args.topic, server=name)
        server = oslo_messaging.get_rpc_server(
            transport,
            target,
            [Endpoint(name)],
            executor="threading",
            access_policy=oslo_messaging.DefaultRPCAccessPolicy,
        )
        server.start()
        servers.append(server)
    emit({"event": "ready"})
    try:
        wait_for_stdin_close(args.max_seconds)
    finally:
        for server in servers:
            server.stop()
        for server in servers:
            server.wait()


def run_listener(args: argparse.Namespace, transport: Any) -> None:
    notify_transport = oslo_messaging.get_notification_transport(cfg.CONF, url=args.url)
    listener = oslo_messaging.get_notification_listener(
        notify_transport,
        [oslo_messaging.Target(topic=args.topic)],
        [NotificationEndpoint()],
        executor="threading",
    )
    listener.start()
    emit({"event": "ready"})
    try:
        wait_for_stdin_close(args.max_seconds)
    finally:
        listener.stop()
        listener.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["server", "client", "listener"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--servers", default="oslo1")
    parser.add_argument("--allowed-exmods", default="")
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument(
        "--rabbit-opt",
        action="append",
        default=[],
        help="NAME=VALUE for [oslo_messaging_rabbit], e.g. rabbit_quorum_queue=true (repeatable)",
    )
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    # Hard stop: whatever happens, the peer never outlives its budget.
    watchdog = threading.Timer(args.max_seconds + 10, os._exit, args=(3,))
    watchdog.daemon = True
    watchdog.start()
    transport = make_transport(args)
    try:
        {"server": run_server, "client": run_client, "listener": run_listener}[args.mode](
            args, transport
        )
    finally:
        transport.cleanup()
    sys.stdout.flush()
    # Non-daemon oslo threads (heartbeats, executors) must not keep the process alive.
    os._exit(0)


if __name__ == "__main__":
    main()
