"""A private, restartable PostgreSQL server: stand-in for ``shared_objects.testing.postgres_node``.

That module (``PostgresNode``) is being written on another branch; the campaign imports it when
it exists (see ``campaign.env``) and this stand-in, with the same surface, until then. Delete
this file once ``shared_objects/testing/postgres_node.py`` has landed.

``initdb`` + ``pg_ctl`` in a temp directory (as the ``postgres`` user when run as root), TCP on
127.0.0.1 only, a Unix socket in the temp directory, trust authentication, fsync off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import tempfile
from pathlib import Path
from types import TracebackType

from shared_objects.testing import free_port

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)


class PostgresNodeError(RuntimeError):
    """The private server could not be created, started or stopped."""


class PostgresNode:
    """One private PostgreSQL server on loopback; always removed by its owner."""

    def __init__(self, *, ctl_timeout: float = 120.0) -> None:
        self.port = free_port()
        self.ctl_timeout = ctl_timeout
        self._base: Path | None = None
        self._as: list[str] = []

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` database (user ``postgres``, trust)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data_dir(self) -> Path:
        if self._base is None:
            raise PostgresNodeError("server not created")
        return self._base / "data"

    async def __aenter__(self) -> PostgresNode:
        try:
            await self._create()
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _create(self) -> None:
        if PG_BIN is None:
            raise PostgresNodeError("no PostgreSQL server binaries under /usr/lib/postgresql")
        self._base = Path(tempfile.mkdtemp(prefix="fleet-pg-"))
        if os.geteuid() == 0:
            # initdb refuses to run as root.
            self._as = ["runuser", "-u", "postgres", "--"]
            owner = pwd.getpwnam("postgres")
            os.chown(self._base, owner.pw_uid, owner.pw_gid)
        await self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "-A", "trust")
        conf = (
            "\nlisten_addresses = '127.0.0.1'\n"
            f"port = {self.port}\n"
            f"unix_socket_directories = '{self._base}'\n"
            "fsync = off\nmax_connections = 200\n"
        )
        await asyncio.to_thread(self._append, self.data_dir / "postgresql.conf", conf)

    @staticmethod
    def _append(path: Path, text: str) -> None:
        with path.open("a") as handle:
            handle.write(text)

    async def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        assert self._base is not None
        await self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", str(self._base / "log"), "-w", "start"
        )

    async def stop(self, *, remove: bool = True) -> None:
        """Stop the server (immediate mode; SIGKILL if that fails) and delete its files."""
        if self._base is None:
            return
        try:
            with contextlib.suppress(PostgresNodeError, TimeoutError):
                await self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
            await self.kill()
        finally:
            if remove:
                shutil.rmtree(self._base, ignore_errors=True)
                self._base = None

    async def restart(self, down_for: float = 0.0) -> None:
        """Fast shutdown (every session is disconnected), ``down_for`` seconds down, start."""
        await self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        if down_for > 0:
            await asyncio.sleep(down_for)
        await self.start()

    async def kill(self) -> None:
        """SIGKILL the postmaster and its backends (a crash); ``start()`` brings it back."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        # Backends exit once their postmaster is gone; wait for the port to close.
        for _ in range(100):
            if not await self._answers():
                break
            await asyncio.sleep(0.1)
        with contextlib.suppress(OSError):
            pid_file.unlink()

    async def _answers(self) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 1)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def _run(self, tool: str, *args: str) -> str:
        assert PG_BIN is not None and self._base is not None
        proc = await asyncio.create_subprocess_exec(
            *self._as,
            str(PG_BIN / tool),
            *args,
            cwd=self._base,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.ctl_timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise PostgresNodeError(f"{tool} failed ({proc.returncode}): {text}")
        return text
