"""TLS to the broker (``amqps://`` + an ``ssl.SSLContext``), through a TLS-terminating proxy on
loopback in front of the plain broker port: the client must verify the proxy's certificate."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared_objects.context import RequestContext
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import (
    MessagingError,
    RPCClient,
    RPCServer,
    Target,
    expose,
    get_transport,
)
from shared_objects.testing.broker import BrokerJanitor, vhost_path

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl"),
]


class Ping:
    @expose
    async def ping(self, ctxt: RequestContext) -> str:
        return "pong"


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass  # either side went away: the other pipe closes too
    finally:
        writer.close()


@pytest.fixture
async def tls_port(certificate: tuple[Path, Path]) -> AsyncIterator[int]:
    """A TLS listener on 127.0.0.1 forwarding to the broker's plain port 5672."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5672)
        for task in (
            asyncio.create_task(_pipe(reader, up_writer)),
            asyncio.create_task(_pipe(up_reader, writer)),
        ):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_amqps_with_verified_certificate_round_trips(
    amqp_url: str,
    tls_port: int,
    certificate: tuple[Path, Path],
    control_exchange: str,
    unique_topic: str,
    janitor: BrokerJanitor,
) -> None:
    janitor.server_topology(control_exchange, unique_topic, "s1")
    context = ssl.create_default_context(cafile=str(certificate[0]))
    config = MessagingConfig(
        transport_url=f"amqps://guest:guest@127.0.0.1:{tls_port}/{vhost_path(amqp_url)}",
        control_exchange=control_exchange,
    )
    async with get_transport(config, ssl_context=context) as transport:
        async with RPCServer(transport, Target(topic=unique_topic, server="s1"), [Ping()]):
            client = RPCClient(transport, Target(topic=unique_topic), timeout=5)
            assert await client.call(None, "ping") == "pong"


async def test_untrusted_certificate_is_refused(tls_port: int, control_exchange: str) -> None:
    config = MessagingConfig(
        transport_url=f"rabbit://guest:guest@127.0.0.1:{tls_port}/?ssl=1",
        control_exchange=control_exchange,
    )
    # Default trust store: the self-signed proxy certificate must not be accepted.
    with pytest.raises(MessagingError, match="cannot connect"):
        async with get_transport(config, connect_timeout=5):
            pass
