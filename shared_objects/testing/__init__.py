"""Test helpers shipped with the package, for Fleet's own tests and for anyone testing against it.

- ``tcp_proxy.TcpProxy``: a loopback TCP proxy for latency, partitions and resets.
- ``rabbit_node.RabbitNode``: a private, throwaway RabbitMQ node that may be restarted or killed.
- ``postgres_node.PostgresNode``: a private, throwaway PostgreSQL that may be restarted or killed.
- ``call_stream.CallStream``: many calls at bounded concurrency, each outcome and duration recorded.
- ``peer_process.PeerProcess``: a helper process driven by JSON lines (e.g. an oslo.messaging peer).
"""

from shared_objects.testing.call_stream import CallOutcome, CallStream
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
    "free_port",
]
