"""A private RabbitMQ node and a private PostgreSQL, both with TLS, and the test CA behind them.

Nothing here touches the shared broker or database: the node and the PostgreSQL cluster live in
temp directories, listen on loopback ports picked at random, and are removed afterwards.

Broker: the TLS listener on 127.0.0.1 and 127.0.0.2 presents a certificate for ``localhost`` /
127.0.0.1 (so 127.0.0.2 is "the wrong host name"), requires a client certificate
(``verify_peer`` + ``fail_if_no_peer_cert``) and offers EXTERNAL (plugin
``rabbitmq_auth_mechanism_ssl``) with the login taken from the certificate's common name.
PostgreSQL: ``hostssl`` only, same certificate shape, listening on 127.0.0.1 and 127.0.0.2.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from tls_support import (
    AGENT_LOGIN,
    PKI,
    PostgresNode,
    TLSNode,
    postgres_available,
    tls_postgres_node,
)

from shared_objects.testing.rabbit_node import RabbitNode, free_port
from shared_objects.testing.tls_certs import have_openssl


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    if not have_openssl():
        pytest.skip("needs the openssl command")
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tls_node(pki: PKI) -> AsyncIterator[TLSNode]:
    if not os.path.exists(os.environ.get("FLEET_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin")):  # noqa: ASYNC240
        pytest.skip("needs rabbitmq-server")
    tls_port = free_port()
    config = f"""
listeners.ssl.default = 127.0.0.1:{tls_port}
listeners.ssl.other = 127.0.0.2:{tls_port}
ssl_options.cacertfile = {pki.ca.cert}
ssl_options.certfile = {pki.server.cert}
ssl_options.keyfile = {pki.server.key}
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = EXTERNAL
ssl_cert_login_from = common_name
"""
    node = RabbitNode(extra_config=config, plugins=["rabbitmq_auth_mechanism_ssl"])
    await node.start()
    try:
        # The agent's login has no password at all: only its certificate can log it in.
        await node.ctl("add_user", AGENT_LOGIN, "unused-then-cleared")
        await node.ctl("clear_password", AGENT_LOGIN)
        await node.ctl("set_permissions", "-p", "/", AGENT_LOGIN, ".*", ".*", ".*")
        yield TLSNode(node, tls_port)
    finally:
        await node.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tls_postgres(pki: PKI) -> AsyncIterator[PostgresNode]:
    missing = postgres_available()
    if missing is not None:
        pytest.skip(missing)
    async with tls_postgres_node(pki) as server:
        yield server
