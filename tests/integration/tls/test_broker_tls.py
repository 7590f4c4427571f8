"""Broker TLS on a private RabbitMQ node (acceptance c, broker).

The node verifies clients (``verify_peer``, ``fail_if_no_peer_cert``) and Fleet verifies the
node: CA from ``?cafile=``, host name checked. The agent's login has no password at all and logs
in with its client certificate (SASL EXTERNAL); its AMQP ``user_id`` is the certificate's CN,
which RabbitMQ validates on every publish, so an RPC round trip proves both.
"""

from __future__ import annotations

import pytest
import structlog
from tls_support import AGENT_LOGIN, PKI, TLSNode

from shared_objects.context import RequestContext
from shared_objects.runtime.config import ConfigError, MessagingConfig, load_config
from shared_objects.runtime.messaging import (
    MessagingError,
    RPCClient,
    RPCServer,
    Target,
    expose,
    get_transport,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.asyncio(loop_scope="module"),
]


class WhoAmI:
    @expose
    async def whoami(self, ctxt: RequestContext) -> str:
        return "pong"


def config(url: str, **kwargs: object) -> MessagingConfig:
    return MessagingConfig(transport_url=url, control_exchange="fleet-tls", **kwargs)  # type: ignore[arg-type]


async def test_agent_logs_in_with_its_certificate_and_rpc_round_trips(
    tls_node: TLSNode, pki: PKI
) -> None:
    # No user, no password: the certificate is the login.
    agent_url = tls_node.url(ca=pki.ca.cert, cert=pki.agent, extra="auth=external")
    # The caller logs in with a password (PLAIN) over the same verified TLS.
    caller_url = tls_node.url(userinfo="guest:guest", ca=pki.ca.cert, cert=pki.conductor)
    async with (
        get_transport(config(agent_url), connect_timeout=10) as agent,
        get_transport(config(caller_url), connect_timeout=10) as caller,
    ):
        assert agent.user_id == AGENT_LOGIN
        async with RPCServer(agent, Target(topic="tls-test", server="h1"), [WhoAmI()]):
            client = RPCClient(caller, Target(topic="tls-test", server="h1"), timeout=10)
            assert await client.call(None, "whoami") == "pong"
            # And back: the agent publishes (user_id = its CN, validated by the broker).
            async with RPCServer(caller, Target(topic="tls-back", server="c1"), [WhoAmI()]):
                back = RPCClient(agent, Target(topic="tls-back", server="c1"), timeout=10)
                assert await back.call(None, "whoami") == "pong"
        # The broker's own view: the agent's connection is TLS, EXTERNAL, as the CN.
        listing = await tls_node.node.ctl(
            "list_connections", "user", "auth_mechanism", "ssl", "--no-table-headers", "-q"
        )
        rows = {tuple(line.split()) for line in listing.splitlines() if line.strip()}
        assert (AGENT_LOGIN, "EXTERNAL", "true") in rows, listing
        assert ("guest", "PLAIN", "true") in rows, listing


async def test_wrong_ca_is_refused_with_one_line_error(tls_node: TLSNode, pki: PKI) -> None:
    url = tls_node.url(ca=pki.wrong_ca.cert, cert=pki.agent, extra="auth=external")
    with pytest.raises(MessagingError) as info:
        async with get_transport(config(url), connect_timeout=10):
            pass
    message = str(info.value)
    assert "TLS certificate verification failed" in message, message
    assert "\n" not in message


async def test_system_store_does_not_trust_the_test_ca(tls_node: TLSNode, pki: PKI) -> None:
    # Verification is on by default: no cafile means the system trust store.
    url = tls_node.url(cert=pki.agent, extra="auth=external")
    with pytest.raises(MessagingError, match="TLS certificate verification failed"):
        async with get_transport(config(url), connect_timeout=10):
            pass


async def test_wrong_host_name_is_refused(tls_node: TLSNode, pki: PKI) -> None:
    # The node listens on 127.0.0.2 too, with a certificate for localhost / 127.0.0.1 only.
    url = tls_node.url(host="127.0.0.2", ca=pki.ca.cert, cert=pki.agent, extra="auth=external")
    with pytest.raises(MessagingError, match="mismatch") as info:
        async with get_transport(config(url), connect_timeout=10):
            pass
    assert "\n" not in str(info.value)


async def test_certificate_from_another_ca_cannot_log_in(tls_node: TLSNode, pki: PKI) -> None:
    # Same CN as the agent, signed by another CA: the broker refuses the handshake.
    url = tls_node.url(ca=pki.ca.cert, cert=pki.stranger, extra="auth=external")
    with pytest.raises(MessagingError, match="cannot connect"):
        async with get_transport(config(url), connect_timeout=10):
            pass


async def test_no_verify_ssl_needs_tls_insecure_and_is_logged(tls_node: TLSNode, pki: PKI) -> None:
    url = tls_node.url(cert=pki.agent, extra="auth=external&no_verify_ssl=1")
    with pytest.raises(MessagingError, match="tls_insecure"):
        get_transport(config(url))
    with pytest.raises(ConfigError, match="tls_insecure"):
        load_config({"FLEET_TRANSPORT_URL": url})
    with structlog.testing.capture_logs() as logs:
        transport = get_transport(config(url, tls_insecure=True), connect_timeout=10)
    assert any(e["event"] == "broker_tls_unverified" and e["log_level"] == "warning" for e in logs)
    async with transport:
        assert transport.user_id == AGENT_LOGIN
