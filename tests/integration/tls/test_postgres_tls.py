"""The conductor's database over TLS with ``sslmode=verify-full`` (acceptance c, PostgreSQL).

A private PostgreSQL started by the test accepts TLS connections only; its certificate names
``localhost`` / 127.0.0.1 and is signed by the test CA. The right CA connects on both execution
paths (SQLAlchemy's and the driver path on the pooled asyncpg connection); a wrong CA and a
wrong host name are refused with a one-line error.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text
from tls_support import PKI, PostgresNode

from conductor.db import migration
from conductor.db.session import Database, create_engine

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.asyncio(loop_scope="module"),
]


def verify_full(pg: PostgresNode, ca: object, host: str = "127.0.0.1") -> str:
    return pg.url_for(host, query=f"sslmode=verify-full&sslrootcert={ca}")


async def _ssl_in_use(url: str) -> bool:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))
            ).one()
            return bool(row[0])
    finally:
        await engine.dispose()


async def test_right_ca_connects_with_tls(tls_postgres: PostgresNode, pki: PKI) -> None:
    assert await _ssl_in_use(verify_full(tls_postgres, pki.ca.cert))


@pytest.mark.parametrize("driver_path", [True, False], ids=["driver-path", "sqlalchemy"])
async def test_conductor_database_works_over_verify_full_on_both_paths(
    tls_postgres: PostgresNode, pki: PKI, driver_path: bool
) -> None:
    url = verify_full(tls_postgres, pki.ca.cert)
    await migration.upgrade(url)
    database = Database(url, driver_path=driver_path)
    assert database.driver_path is driver_path
    try:
        async with database.request() as db:
            await db.insert(
                "services",
                {"host": f"tls-{driver_path}", "binary": "fleet-conductor", "topic": "conductor"},
            )
        async with database.request() as db:
            rows = await db.select("services", {"host": f"tls-{driver_path}"})
        assert [r["host"] for r in rows] == [f"tls-{driver_path}"]
    finally:
        await database.dispose()


async def _refusal(url: str) -> str:
    engine = create_engine(url, pool_size=1)
    try:
        with pytest.raises(Exception) as info:
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
    return str(info.value.orig if hasattr(info.value, "orig") else info.value)


async def test_wrong_ca_is_refused_with_one_line(tls_postgres: PostgresNode, pki: PKI) -> None:
    message = await _refusal(verify_full(tls_postgres, pki.wrong_ca.cert))
    assert "certificate verify failed" in message
    assert "\n" not in message.strip()


async def test_wrong_host_name_is_refused(tls_postgres: PostgresNode, pki: PKI) -> None:
    # 127.0.0.2 is the same server, but its certificate names localhost / 127.0.0.1 only.
    message = await _refusal(verify_full(tls_postgres, pki.ca.cert, host="127.0.0.2"))
    assert "mismatch" in message.lower()
    assert "\n" not in message.strip()
    # verify-ca checks the chain but not the name: the same connection is accepted.
    assert await _ssl_in_use(
        tls_postgres.url_for("127.0.0.2", query=f"sslmode=verify-ca&sslrootcert={pki.ca.cert}")
    )


async def test_missing_ca_file_is_a_one_line_error(tls_postgres: PostgresNode) -> None:
    with pytest.raises(ValueError, match=r"database TLS: cannot load CA /nonexistent/ca.pem"):
        create_engine(verify_full(tls_postgres, "/nonexistent/ca.pem"))
