"""A private, throwaway PostgreSQL cluster for fault tests (restart, kill) and TLS tests.

The shared PostgreSQL on 127.0.0.1:5432 is used by everyone on the machine and must never be
restarted; a test that needs to restart or kill "the database" starts its own cluster::

    async with PostgresNode() as pg:
        await migration.upgrade(pg.url)      # database ``fleet``, user ``postgres``, trust
        ...
        await pg.restart(down_for=3.0)       # fast shutdown, 3 s down, start again
        await pg.kill()                      # SIGKILL the postmaster and its backends
        await pg.start()                     # crash recovery, same port and data

Isolation: ``initdb`` in a temp directory (run as the ``postgres`` user when the test runs as
root), a free loopback port, its Unix socket in that directory, removed by ``stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from shared_objects.testing.rabbit_node import free_port

__all__ = ["PG_BIN", "PostgresNode", "PostgresNodeError", "postgres_available"]

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)


class PostgresNodeError(RuntimeError):
    """The private cluster could not be created, started or stopped."""


def postgres_available() -> str | None:
    """Why a private cluster cannot be made here, or None when it can (for ``pytest.skip``)."""
    if PG_BIN is None or not (PG_BIN / "initdb").exists():
        return "needs PostgreSQL server binaries (initdb, pg_ctl)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root needs a 'postgres' user to run initdb as"
    return None


class PostgresNode:
    """One private PostgreSQL cluster on loopback, created and always removed by its owner."""

    def __init__(
        self,
        *,
        database: str = "fleet",
        listen: Sequence[str] = ("127.0.0.1",),
        tls_cert: tuple[Path, Path] | None = None,
        timeout: float = 120.0,
    ) -> None:
        """Prepare (not start) a cluster with database ``database`` owned by ``postgres``.

        ``tls_cert`` (certificate, key) turns TLS on and makes it the only way in over TCP.
        """
        self.database = database
        self.port = free_port()
        self._listen = tuple(listen)
        self._tls_cert = tls_cert
        self._timeout = timeout
        self._base: Path | None = None
        self._as: list[str] = []
        self._owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            self._owner = pwd.getpwnam("postgres")

    @property
    def url(self) -> str:
        """SQLAlchemy asyncpg URL of the database ``fleet`` (user ``postgres``, trust)."""
        return self.url_for()

    def url_for(
        self, host: str = "127.0.0.1", *, database: str | None = None, query: str = ""
    ) -> str:
        """The asyncpg URL for another listen address, database or query string."""
        name = database or self.database
        tail = f"?{query}" if query else ""
        return f"postgresql+asyncpg://postgres@{host}:{self.port}/{name}{tail}"

    @property
    def data_dir(self) -> Path:
        if self._base is None:
            raise PostgresNodeError("cluster not created")
        return self._base / "data"

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the cluster on first use, then start it and wait until it accepts connections
        (after ``kill()`` this runs crash recovery on the same data and port)."""
        first = self._base is None
        if first:
            self._base = Path(tempfile.mkdtemp(prefix="fleet-pg-"))
            try:
                await self._create()
            except BaseException:
                self._remove_files()
                raise
        try:
            await self._ctl("start", "-l", str(self._base_dir / "log"), "-w")
        except PostgresNodeError as exc:
            raise PostgresNodeError(f"{exc}\n--- server log\n{self._tail_log()}") from None
        if first:
            try:
                await self._run("createdb", "-h", str(self._base_dir), "-p", str(self.port),
                                "-U", "postgres", self.database)  # fmt: skip
            except BaseException:
                await self.stop()
                raise

    async def stop(self) -> None:
        """Stop the cluster at once and delete its files."""
        if self._base is None:
            return
        try:
            await self._shutdown("immediate")
        finally:
            self._remove_files()

    async def restart(self, down_for: float = 0.0) -> None:
        """Shut down (``fast``: clients see their connections terminated), stay down
        ``down_for`` seconds, start again."""
        await self._shutdown("fast")
        if down_for > 0:
            await asyncio.sleep(down_for)
        await self.start()

    async def kill(self) -> None:
        """SIGKILL the postmaster and its backends (a crash); ``start()`` brings it back."""
        pids = await asyncio.to_thread(self._cluster_pids)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # The next start refuses while an old backend still holds the shared memory.
        for _ in range(100):
            if not any(_alive(pid) for pid in pids):
                break
            await asyncio.sleep(0.05)
        # The lock files name the dead postmaster; its pid may linger as a zombie where nothing
        # reaps orphans (containers), which the next postmaster would take for a live owner.
        for lock in (
            self.data_dir / "postmaster.pid",
            self._base_dir / f".s.PGSQL.{self.port}.lock",
        ):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()

    async def __aenter__(self) -> PostgresNode:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- internals -----------------------------------------------------------------------------

    @property
    def _base_dir(self) -> Path:
        if self._base is None:
            raise PostgresNodeError("cluster not created")
        return self._base

    async def _create(self) -> None:
        base = self._base_dir
        if self._owner is not None:
            os.chown(base, self._owner.pw_uid, self._owner.pw_gid)
        data = base / "data"
        await self._run("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
        conf = [
            f"listen_addresses = '{','.join(self._listen)}'",
            f"port = {self.port}",
            f"unix_socket_directories = '{base}'",
            "fsync = off",
            "max_connections = 200",
        ]
        hba = "local all all trust\n"
        if self._tls_cert is not None:
            for name, source in zip(("server.crt", "server.key"), self._tls_cert, strict=True):
                target = data / name
                shutil.copyfile(source, target)
                target.chmod(0o600)
                if self._owner is not None:
                    os.chown(target, self._owner.pw_uid, self._owner.pw_gid)
            conf += ["ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"]
            # TLS or nothing over TCP: a connection that works here is a TLS connection.
            hba += "hostssl all all 127.0.0.0/8 trust\nhostnossl all all 0.0.0.0/0 reject\n"
        else:
            hba += "host all all 127.0.0.0/8 trust\n"
        with (data / "postgresql.conf").open("a") as handle:
            handle.write("\n" + "\n".join(conf) + "\n")
        (data / "pg_hba.conf").write_text(hba)

    async def _shutdown(self, mode: str) -> None:
        if self._base is None or not (self.data_dir / "postmaster.pid").exists():
            return
        try:
            await self._ctl("stop", "-m", mode, "-w")
        except (PostgresNodeError, TimeoutError):
            await self.kill()

    async def _ctl(self, *args: str) -> None:
        await self._run("pg_ctl", "-D", str(self.data_dir), *args)

    async def _run(self, tool: str, *args: str) -> None:
        if PG_BIN is None:
            raise PostgresNodeError("PostgreSQL server binaries not found in /usr/lib/postgresql")
        proc = await asyncio.create_subprocess_exec(
            *self._as, str(PG_BIN / tool), *args,
            cwd=str(self._base_dir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Own session: the postmaster pg_ctl starts must not get the terminal's Ctrl-C
            # (the owner stops it, in order, when it unwinds).
            start_new_session=True,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self._timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise PostgresNodeError(
                f"{tool} failed ({proc.returncode}): {out.decode(errors='replace')}"
            )

    def _cluster_pids(self) -> list[int]:
        """The postmaster (from postmaster.pid) and every process whose parent it is."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            postmaster = int(first)
        except (OSError, ValueError):
            return []
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                # "pid (comm) state ppid ...": comm may hold spaces, so split after the ')'.
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == postmaster:
                    children.append(int(stat.parent.name))
        return [postmaster, *children]

    def _tail_log(self, limit: int = 2000) -> str:
        try:
            return (self._base_dir / "log").read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def _remove_files(self) -> None:
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed child of a process that is gone too is reaped by init; a zombie is as good as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
