"""Test helpers shipped with the package, for Fleet's own tests and for anyone testing against it.

- ``tcp_proxy.TcpProxy``: a loopback TCP proxy for latency, partitions and resets.
- ``rabbit_node.RabbitNode``: a private, throwaway RabbitMQ node that may be restarted or killed.
"""

from shared_objects.testing.rabbit_node import RabbitNode, RabbitNodeError, free_port
from shared_objects.testing.tcp_proxy import ProxyMode, TcpProxy

__all__ = ["ProxyMode", "RabbitNode", "RabbitNodeError", "TcpProxy", "free_port"]
