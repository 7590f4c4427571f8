"""The compose cluster's broker definitions, loaded at boot by a real (private) RabbitMQ node as
the compose ``rabbitmq`` service loads them: every service's URL logs in, with its role's rights
only, and there is no ``guest``."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq
import pytest
import yaml

from shared_objects.testing.rabbit_node import RabbitNode

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[3]
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"


def service_urls() -> dict[str, str]:
    """Each service's transport URL: the compose secret file its environment names."""
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    files = {name: ROOT / spec["file"] for name, spec in compose.get("secrets", {}).items()}
    urls = {}
    for name, service in compose["services"].items():
        path = service.get("environment", {}).get("FLEET_MESSAGING__TRANSPORT_URL_FILE")
        if path:
            urls[name] = files[path.removeprefix("/run/secrets/")].read_text().strip()
    return urls


def on_node(url: str, node: RabbitNode) -> str:
    parts = urlsplit(url)
    return f"amqp://{parts.username}:{parts.password}@127.0.0.1:{node.port}{parts.path}"


async def _declare(url: str, queue: str) -> str:
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        await channel.declare_queue(queue)
        return "ok"
    except aiormq.exceptions.ChannelAccessRefused:
        return "ACCESS_REFUSED"
    finally:
        await connection.close()


async def test_each_compose_login_works_with_its_role_rights_only() -> None:
    try:
        node = RabbitNode(extra_config=f"load_definitions = {DEFINITIONS}")
        await node.start()
    except Exception as exc:  # no rabbitmq-server scripts on this machine
        pytest.skip(f"no private RabbitMQ node: {exc}")
    try:
        urls = {name: on_node(url, node) for name, url in service_urls().items()}
        assert set(urls) == {"migrate", "conductor", "compute-1", "compute-2"}
        assert await _declare(urls["conductor"], "conductor") == "ok"
        for host in ("compute-1", "compute-2"):
            assert await _declare(urls[host], f"compute.{host}") == "ok"
            assert await _declare(urls[host], "conductor") == "ACCESS_REFUSED"
        assert await _declare(urls["compute-1"], "compute.compute-2") == "ACCESS_REFUSED"
        assert await _declare(urls["migrate"], "compute.compute-1") == "ACCESS_REFUSED"
        with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
            await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{node.port}/", timeout=10)
    finally:
        await node.stop()
