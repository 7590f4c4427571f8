"""Test helpers shipped with the package, for Fleet's own tests and for anyone testing against it.

- ``tcp_proxy.TcpProxy``: a loopback TCP proxy for latency, partitions and resets.
- ``rabbit_node.RabbitNode``: a private, throwaway RabbitMQ node that may be restarted or killed.
- ``postgres_node.PostgresNode``: a private, throwaway PostgreSQL that may be restarted or killed.
- ``call_stream.CallStream``: many calls at bounded concurrency, each outcome and duration recorded.
- ``peer_process.PeerProcess``: a helper process driven by JSON lines (e.g. an oslo.messaging peer).
- ``isolation``: a private vhost and a fresh database on the shared services (tests, bench/, demos).
- ``eventually.eventually``: poll a condition against a deadline instead of sleeping.
- ``fleet.in_process_fleet``: a conductor and N real agents in this process (memory transport).
- ``forged``: a reply as a hostile login would publish it, reply checks naming who may answer.
- ``pytest_plugin``: all of the above as pytest fixtures (``docs/architecture.md``, "Test kit").
"""

from shared_objects.testing.call_stream import CallOutcome, CallStream
from shared_objects.testing.eventually import eventually
from shared_objects.testing.isolation import fresh_database, private_vhost, vhost_url
from shared_objects.testing.peer_process import PeerError, PeerProcess
from shared_objects.testing.postgres_node import PostgresNode, PostgresNodeError
from shared_objects.testing.rabbit_node import RabbitNode, RabbitNodeError, free_port
from shared_objects.testing.tcp_proxy import ProxyMode, TcpProxy

__all__ = [
    "CallOutcome",
    "CallStream",
    "PeerError",
    "PeerProcess",
    "PostgresNode",
    "PostgresNodeError",
    "ProxyMode",
    "RabbitNode",
    "RabbitNodeError",
    "TcpProxy",
    "eventually",
    "free_port",
    "fresh_database",
    "private_vhost",
    "vhost_url",
]
