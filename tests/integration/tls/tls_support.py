"""Helpers of the TLS tests: the PKI, the TLS broker node's URLs, a private PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from shared_objects.testing.rabbit_node import RabbitNode, free_port
from shared_objects.testing.tls_certs import IssuedCert, TestCA

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)
AGENT_LOGIN = "fleet-host-tls-1"


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


class PrivatePostgres:
    """``initdb`` + ``pg_ctl`` in a temp directory, as the ``postgres`` user when run as root."""

    def __init__(self, server: IssuedCert) -> None:
        assert PG_BIN is not None
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="fleet-pg-tls-"))
        self.data = self.base / "data"
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            owner = pwd.getpwnam("postgres")
            os.chown(self.base, owner.pw_uid, owner.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        for name, source in (("server.crt", server.cert), ("server.key", server.key)):
            target = self.data / name
            shutil.copyfile(source, target)
            target.chmod(0o600)
            if self._as:
                os.chown(target, owner.pw_uid, owner.pw_gid)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\nlisten_addresses = '127.0.0.1,127.0.0.2'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.base}'\n"
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
                "fsync = off\n"
            )
        # TLS or nothing over TCP: a connection that works here is a TLS connection.
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.0/8 trust\n"
            "hostnossl all all 0.0.0.0/0 reject\n"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "log"), "-w", "start")

    def _run(self, tool: str, *args: str) -> None:
        assert PG_BIN is not None
        done = subprocess.run(
            [*self._as, str(PG_BIN / tool), *args],
            capture_output=True, text=True, timeout=120, check=False, cwd=self.base,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stdout}{done.stderr}")

    def url(self, host: str = "127.0.0.1", query: str = "") -> str:
        return f"postgresql+asyncpg://postgres@{host}:{self.port}/postgres" + (
            f"?{query}" if query else ""
        )

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)
