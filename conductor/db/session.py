"""The conductor's database: the async engine and the per-request unit of work."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, unquote

import structlog
from sqlalchemy import URL, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from conductor.db.api import DbApi
from conductor.db.ownership import OwnerScope
from conductor.db.pool import POOL_BORN_KEY, PoolHealth, uses_driver_path
from shared_objects.runtime.tls import TLSConfigError, client_context, is_loopback
from shared_objects.runtime.url_secrets import split_authority

log = structlog.get_logger(__name__)


def quiet_statement_logging() -> None:
    """Keep SQLAlchemy from logging every statement.

    SQLAlchemy treats its engine logger being enabled for INFO as ``echo=True``: one log line
    per statement floods the service log and costs CPU on every query. Statement logging is for
    debugging (``echo=True`` on a throwaway engine), never for a running conductor.
    """
    for name in ("sqlalchemy.engine", "sqlalchemy.engine.Engine"):
        logging.getLogger(name).setLevel(logging.WARNING)


# The task holding the SQLite unit (tasks started inside a unit inherit the value, but they are
# other tasks: they wait for the lock instead of being refused).
_SQLITE_UNIT_OWNER: contextvars.ContextVar[asyncio.Task[Any] | None] = contextvars.ContextVar(
    "sqlite_unit_owner", default=None
)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

# libpq's TLS options in the URL query; Fleet turns them into asyncpg's ``ssl=`` argument.
_TLS_QUERY_KEYS = ("sslmode", "ssl", "sslrootcert", "sslcert", "sslkey")
_VERIFYING_MODES = ("verify-ca", "verify-full")


@dataclasses.dataclass(frozen=True, slots=True)
class DatabaseTLS:
    """What ``create_engine`` does about TLS for one PostgreSQL URL."""

    mode: str | None  # the URL's sslmode (or ssl), None if absent
    connect_ssl: Any  # asyncpg's ssl= argument (False, a mode string or an SSLContext); None: unset
    verified: bool  # the server's certificate (and, for verify-full, its name) is checked
    loopback: bool


def database_tls(url: URL) -> DatabaseTLS:
    """TLS for a ``postgresql+asyncpg`` URL, from libpq-style query options.

    ``sslmode=verify-full`` (or ``verify-ca``) builds an ``SSLContext`` trusting
    ``sslrootcert`` (a PEM CA file; absent: the system trust store, not libpq's
    ``~/.postgresql/root.crt``); verify-full also checks that the server certificate names the
    host of the URL. ``sslcert``/``sslkey``: a client certificate. ``ssl=`` is accepted as
    another spelling of ``sslmode=``. Other modes (``require``, ``prefer`` ...) encrypt without
    verifying: asyncpg's behaviour. With no mode, a loopback host gets no TLS at all.
    """
    query = {k.lower(): v for k, v in url.query.items()}
    raw = query.get("sslmode", query.get("ssl"))
    mode = raw if isinstance(raw, str) or raw is None else raw[-1]
    loopback = is_loopback(url.host) and not url.query.get("host")
    if mode in _VERIFYING_MODES:

        def one(key: str) -> str | None:
            value = query.get(key)
            return value if isinstance(value, str) or value is None else value[-1]

        try:
            context = client_context(
                cafile=one("sslrootcert"),
                certfile=one("sslcert"),
                keyfile=one("sslkey"),
                check_hostname=mode == "verify-full",
            )
        except TLSConfigError as exc:
            raise ValueError(f"database TLS: {exc}") from None
        return DatabaseTLS(mode, context, True, loopback)
    if mode is None:
        return DatabaseTLS(None, False if loopback else None, False, loopback)
    if mode == "disable":
        return DatabaseTLS(mode, False, False, loopback)
    return DatabaseTLS(mode, mode, False, loopback)


def normalize_url(url: str) -> URL:
    """``url`` as a SQLAlchemy URL, user-info split at the last ``@`` (a password may contain
    ``/ , @ : ?`` unencoded: ``shared_objects.runtime.url_secrets``)."""
    scheme, sep, rest = url.partition("://")
    parts, tail = split_authority(rest) if sep else ([], "")
    if len(parts) != 1 or parts[0].userinfo is None:
        return make_url(url)
    part = parts[0]
    user = quote(unquote(part.user or ""), safe="")
    creds = user
    if part.password is not None:
        creds += ":" + quote(unquote(part.password), safe="")
    return make_url(f"{scheme}{sep}{creds}@{part.hostport}{tail}")


def create_engine(url: str, *, pool_size: int = 64, max_overflow: int = 0) -> AsyncEngine:
    """An async engine for ``url`` (``postgresql+asyncpg://`` or ``sqlite+aiosqlite://``).

    SQLite gets one shared connection: it allows a single writer anyway, and one connection
    turns concurrent requests into a queue instead of ``database is locked`` errors.

    PostgreSQL: the pool keeps up to ``pool_size`` connections, opened on demand and then kept:
    the default matches the RPC server's 64 concurrent handlers, because overflow connections
    (opened and closed again per burst) cost the conductor a third of its throughput at c=64.
    TLS is configuration (``database_tls``): ``?sslmode=verify-full&sslrootcert=/path/ca.pem``
    verifies the server; it applies to every pooled connection, so to both execution paths
    (SQLAlchemy's and the driver path of ``conductor.db.asyncpg_exec``). asyncpg tries TLS first
    on every new connection by default; on a loopback host with no ``sslmode`` that attempt is
    skipped. A host off this machine without verified TLS is logged at WARNING.
    """
    quiet_statement_logging()
    parsed = normalize_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        kwargs["poolclass"] = StaticPool
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_size"] = pool_size
        kwargs["max_overflow"] = max_overflow
        # No pre-ping: it costs a round trip per request; a dead connection fails the request,
        # is invalidated by SQLAlchemy, and the next checkout gets a fresh one.
        kwargs["pool_recycle"] = 3600
        tls = database_tls(parsed)
        parsed = parsed.difference_update_query(
            [k for k in parsed.query if k.lower() in _TLS_QUERY_KEYS]
        )
        if tls.connect_ssl is not None:
            kwargs["connect_args"] = {"ssl": tls.connect_ssl}
        if not tls.verified and not tls.loopback:
            log.warning(
                "database_tls_unverified",
                host=parsed.host,
                sslmode=tls.mode,
                detail="a database off this machine without a verified certificate: use "
                "?sslmode=verify-full&sslrootcert=<CA file> (docs/operations.md, TLS)",
            )
        elif tls.verified:
            log.info("database_tls", host=parsed.host, sslmode=tls.mode)
    engine = create_async_engine(parsed, **kwargs)

    @event.listens_for(engine.sync_engine, "connect")
    def _remember_birth(_dbapi_conn: Any, record: Any) -> None:
        # Read by PoolHealth: connections opened before a connection loss are dropped.
        record.info[POOL_BORN_KEY] = time.monotonic()

    if parsed.get_backend_name() == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


class Database:
    """Owns the engine; hands out one ``DbApi`` per request."""

    def __init__(
        self, url: str, *, engine: AsyncEngine | None = None, driver_path: bool | None = None
    ) -> None:
        """``driver_path``: run statements on the asyncpg connection directly
        (``conductor.db.asyncpg_exec``); default: whenever the URL is PostgreSQL via asyncpg.
        ``False`` keeps every statement on SQLAlchemy's execution (tests compare the two)."""
        self.url = url
        # Logging may have been configured after the module was imported: quiet it again.
        quiet_statement_logging()
        self.engine = engine if engine is not None else create_engine(url)
        self.driver_path = uses_driver_path(self.engine) if driver_path is None else driver_path
        if self.driver_path and not uses_driver_path(self.engine):
            raise ValueError(f"the driver path needs postgresql+asyncpg, not {url!r}")
        self.health = PoolHealth()
        self._sqlite = normalize_url(url).get_backend_name() == "sqlite"
        self._sqlite_lock: asyncio.Lock | None = None

    @asynccontextmanager
    async def request(
        self,
        context: Any = None,
        *,
        single_call: bool = False,
        scope: OwnerScope | None = None,
    ) -> AsyncIterator[DbApi]:
        """A unit of work: sets ``context.db`` for the request, commits when it ends cleanly,
        rolls back when it raises, always returns the connection to the pool.

        ``single_call``: the unit serves exactly one remotable call (the indirection endpoint),
        so a ``standalone`` write may commit on its own. Any other caller gets full atomicity:
        everything written in the block commits or rolls back together.

        ``scope``: every statement of the unit runs under that ownership scope (an agent's
        call: ``conductor.db.ownership``); a refusal raises ``Forbidden`` and, like any error,
        rolls the unit back. None (the default): unrestricted.
        """
        if self._sqlite:
            # One shared connection: requests must take turns, whole transactions at a time.
            # A unit opened inside another one in the same task would wait for itself forever.
            if _SQLITE_UNIT_OWNER.get() is asyncio.current_task():
                raise RuntimeError(
                    "nested Database.request() on SQLite would deadlock: reuse the outer "
                    "unit's context (its context.db) instead"
                )
            if self._sqlite_lock is None:
                self._sqlite_lock = asyncio.Lock()
            async with self._sqlite_lock:
                token = _SQLITE_UNIT_OWNER.set(asyncio.current_task())
                try:
                    async with self._unit(context, single_call, scope) as db:
                        yield db
                finally:
                    _SQLITE_UNIT_OWNER.reset(token)
        else:
            async with self._unit(context, single_call, scope) as db:
                yield db

    @asynccontextmanager
    async def _unit(
        self, context: Any, single_call: bool, scope: OwnerScope | None
    ) -> AsyncIterator[DbApi]:
        db = DbApi(
            self.engine,
            allow_standalone=single_call,
            driver_path=self.driver_path,
            health=self.health,
            scope=scope,
        )
        previous = getattr(context, "db", None) if context is not None else None
        if context is not None:
            context.db = db
        try:
            try:
                yield db
            except BaseException:
                await db.rollback()
                raise
            await db.commit()
        finally:
            await db.close()
            if context is not None:
                context.db = previous

    async def dispose(self) -> None:
        await self.engine.dispose()
