"""Room of one's own on the shared RabbitMQ and PostgreSQL: a private vhost, a fresh database.

Plain helpers (no pytest): the test plugin, ``bench/`` and the demos use the same ones. Queue
names (``conductor``, ``compute.<host>``) do not depend on the control exchange, so two runs on
one broker would share queues and steal each other's messages; a vhost per run isolates them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

#: The shared broker and PostgreSQL of a developer machine and CI (loopback only).
AMQP_URL = os.environ.get("FLEET_TEST_TRANSPORT_URL", "rabbit://guest:guest@127.0.0.1:5672/")
PG_ADMIN_DSN = os.environ.get(
    "FLEET_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


class VhostUnavailable(RuntimeError):
    """``rabbitmqctl`` is missing or refused to create the vhost."""


def _ctl(*argv: str) -> bool:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return False
    done = subprocess.run([ctl, "-q", *argv], capture_output=True, timeout=60)
    return done.returncode == 0


@contextlib.contextmanager
def private_vhost(prefix: str = "fleet-test", *, required: bool = False) -> Iterator[str]:
    """A RabbitMQ vhost ``<prefix>-<hex>`` on the local node, with full rights for ``guest``,
    deleted at the end. Without a usable ``rabbitmqctl`` it yields ``""`` (use the URL's own
    vhost), or raises ``VhostUnavailable`` when ``required``."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    created = _ctl("add_vhost", name)
    if not (created and _ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")):
        if created:
            _ctl("delete_vhost", name)
        if required:
            raise VhostUnavailable(f"cannot create vhost {name} (is rabbitmqctl on PATH?)")
        yield ""
        return
    try:
        yield name
    finally:
        _ctl("delete_vhost", name)


def vhost_url(vhost: str, base: str = AMQP_URL) -> str:
    """``base`` (a transport URL ending in ``/``) pointed at ``vhost`` (``base`` itself for
    ``""`` or ``/``)."""
    if not vhost or vhost == "/":
        return base
    return base.rstrip("/") + "/" + vhost


def database_url(name: str, admin_dsn: str = PG_ADMIN_DSN) -> str:
    """The SQLAlchemy (asyncpg) URL of database ``name`` on the admin DSN's server and login."""
    parts = urlsplit(admin_dsn)
    return urlunsplit(("postgresql+asyncpg", parts.netloc, f"/{name}", "", ""))


async def create_database(
    name: str, *, replace: bool = False, admin_dsn: str = PG_ADMIN_DSN
) -> str:
    """Create database ``name`` (dropping one of that name first if ``replace``); its URL."""
    import asyncpg  # only where a database is made: the plain helpers above need no driver

    admin = await asyncpg.connect(admin_dsn)
    try:
        if replace:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return database_url(name, admin_dsn)


async def drop_database(name: str, *, admin_dsn: str = PG_ADMIN_DSN) -> None:
    """Drop database ``name`` even while something is still connected to it."""
    import asyncpg

    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def fresh_database(
    prefix: str = "fleet_test", *, admin_dsn: str = PG_ADMIN_DSN
) -> AsyncIterator[str]:
    """A new, empty PostgreSQL database ``<prefix>_<hex>`` (its asyncpg URL), dropped after."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    url = await create_database(name, admin_dsn=admin_dsn)
    try:
        yield url
    finally:
        await drop_database(name, admin_dsn=admin_dsn)
