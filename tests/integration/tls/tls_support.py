"""Helpers of the TLS tests: the PKI and the TLS broker node's URLs."""

from __future__ import annotations

from pathlib import Path

from shared_objects.testing.postgres_node import PostgresNode, postgres_available
from shared_objects.testing.rabbit_node import RabbitNode
from shared_objects.testing.tls_certs import IssuedCert, TestCA

AGENT_LOGIN = "fleet-host-tls-1"

__all__ = [
    "AGENT_LOGIN",
    "PKI",
    "PostgresNode",
    "TLSNode",
    "postgres_available",
    "tls_postgres_node",
]


class PKI:
    """The test CA, a second unrelated CA, and the certificates issued by the first."""

    def __init__(self, base: Path) -> None:
        self.ca = TestCA(base / "ca")
        self.wrong_ca = TestCA(base / "wrong-ca", name="Some Other CA")
        self.server = self.ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1"])
        self.agent = self.ca.issue(AGENT_LOGIN, client=True)
        self.conductor = self.ca.issue("fleet-conductor-tls", client=True)
        # Same login, but signed by the other CA: the broker must refuse it.
        self.stranger = self.wrong_ca.issue(AGENT_LOGIN, client=True, stem="stranger")


class TLSNode:
    def __init__(self, node: RabbitNode, tls_port: int) -> None:
        self.node = node
        self.tls_port = tls_port

    def url(
        self,
        *,
        userinfo: str = "",
        host: str = "127.0.0.1",
        ca: Path | None = None,
        cert: IssuedCert | None = None,
        extra: str = "",
    ) -> str:
        options = []
        if ca is not None:
            options.append(f"cafile={ca}")
        if cert is not None:
            options += [f"certfile={cert.cert}", f"keyfile={cert.key}"]
        if extra:
            options.append(extra)
        at = f"{userinfo}@" if userinfo else ""
        return f"amqps://{at}{host}:{self.tls_port}/?{'&'.join(options)}"


def tls_postgres_node(pki: PKI) -> PostgresNode:
    """A private PostgreSQL presenting the test CA's server certificate, TLS only over TCP,
    listening on 127.0.0.1 and 127.0.0.2 (the second is "the wrong host name")."""
    return PostgresNode(
        listen=("127.0.0.1", "127.0.0.2"), tls_cert=(pki.server.cert, pki.server.key)
    )
