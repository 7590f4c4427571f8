"""A local cluster's processes before they run (``cluster.py`` runs them): the cluster's spec,
each process's broker login (created on demand, in one batch), environment and command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

from shared_objects.context import RequestContext
from shared_objects.exception import ALLOWED_REMOTE_EXMODS
from shared_objects.rpc_clients.compute_task import ComputeTaskAPI
from shared_objects.rpc_clients.conductor import ConductorAPI
from shared_objects.runtime.config import MessagingConfig
from shared_objects.runtime.messaging import Transport, get_transport
from shared_objects.testing.broker_logins import BrokerLogins


@dataclasses.dataclass
class ProcessHandle:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    # Source tree to run from (an older release exported from git), or the installed code.
    cwd: Path | None = None
    # Size of the (appended) log when this process started: what it wrote comes after.
    log_offset: int = 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


@dataclasses.dataclass
class ClusterSpec:
    database_url: str
    transport_url: str = "rabbit://guest:guest@127.0.0.1:5672/"
    control_exchange: str = dataclasses.field(
        default_factory=lambda: f"fleet-cluster-{uuid.uuid4().hex[:10]}"
    )
    hosts: tuple[str, ...] = ("compute-1", "compute-2")
    conductors: int = 1
    workdir: Path = dataclasses.field(default_factory=lambda: Path("var/cluster"))
    # Per-agent extra environment, e.g. {"compute-1": {"FLEET_COMPUTE__FAILURES": "spawn:1"}}.
    agent_env: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    # Environment for every process (e.g. FLEET_COMPUTE__SPAWN_DELAY).
    common_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Hosts whose agent runs another release's code: {host: exported source tree}.
    agent_source: Mapping[str, Path] = dataclasses.field(default_factory=dict)
    # Conductors running another release's code (exported source tree), or None.
    conductor_source: Path | None = None
    report_interval: float = 2.0
    service_down_time: float = 10.0
    # One broker login per process (see the module docstring), on transport_url's hosts and
    # vhost; None: everyone logs in with transport_url's own user.
    logins: BrokerLogins | None = None
    # With logins: agents running another release's code (agent_source) share this login, as a
    # deployment from before per-host logins did; processes on this release's code are told so
    # (FLEET_SECURITY__LEGACY_SHARED_LOGIN, FLEET_SECURITY__LEGACY_HOSTS = those hosts).
    legacy_shared_login: str | None = None
    # [messaging] options (MessagingConfig names, e.g. {"rabbit_quorum_queue": True}) for every
    # process and for this process's own transport: queue declarations must agree.
    messaging: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Hosts whose agent reaches the broker through another loopback port (a ``TcpProxy`` in
    # front of the broker, for partitions): {host: port}. Same login, host and vhost.
    agent_broker_port: Mapping[str, int] = dataclasses.field(default_factory=dict)


class ClusterEnvironment:
    """What each process of a local cluster is given: its broker login, its environment, its
    command line."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        # Absolute: processes may run from another release's source tree (another cwd).
        self.workdir = spec.workdir.resolve()
        self.processes: dict[str, ProcessHandle] = {}
        self.transport: Transport | None = None
        self.conductor: ConductorAPI | None = None
        self.tasks: ComputeTaskAPI | None = None
        self.ctxt = RequestContext(user_id="operator", project_id="admin", is_admin=True)
        self._previous_api: Any = None

    @property
    def operator_login(self) -> str | None:
        """The login of this process (and of ``fleetctl`` run for it); None without logins."""
        logins = self.spec.logins
        return logins.operator_login() if logins is not None else None

    @property
    def operator_url(self) -> str:
        """Transport URL for operator tools (``fleetctl``) against this cluster."""
        return self._url_of(self.operator_login)

    def login_of(self, name: str) -> str | None:
        """The broker login of process ``name`` (``conductor-<n>`` or an agent's host)."""
        logins = self.spec.logins
        if logins is None:
            return None
        kind, _, index = name.rpartition("-")
        if kind == "conductor" and index.isdigit():
            return logins.conductor_login(index)
        if name in self.spec.agent_source and self.spec.legacy_shared_login:
            return self.spec.legacy_shared_login
        return logins.host_login(name)

    @contextlib.asynccontextmanager
    async def transport_as(self, login: str | None) -> AsyncIterator[Transport]:
        """A connected transport logged in as ``login`` (e.g. ``login_of("conductor-1")``, to
        send what only a conductor may); the cluster's URL as given when ``login`` is None."""
        cfg = self._messaging_config(login)
        async with get_transport(cfg, allowed_remote_exmods=ALLOWED_REMOTE_EXMODS) as transport:
            yield transport

    def _messaging_config(self, login: str | None) -> MessagingConfig:
        return MessagingConfig(
            transport_url=self._url_of(login),
            control_exchange=self.spec.control_exchange,
            **self.spec.messaging,
        )

    def _url_of(self, login: str | None) -> str:
        if login is None or self.spec.logins is None:
            return self.spec.transport_url
        return self.spec.logins.url_for(login)

    async def provision(self, *, hosts: Iterable[str] = (), conductors: Iterable[int] = ()) -> None:
        """Create (one batch, only what is missing) the logins of these processes, this
        process's operator login and the permissions on the cluster's control exchange."""
        logins = self.spec.logins
        if logins is None:
            return
        new: list[str] = []
        old: list[str] = []
        for host in hosts:
            if host not in self.spec.agent_source:
                new.append(host)
            elif not self.spec.legacy_shared_login:
                old.append(host)
        shared: dict[str, list[str]] = {}
        if self.spec.legacy_shared_login:
            # It speaks for every host still on older code, and for no other.
            shared[self.spec.legacy_shared_login] = sorted(self.spec.agent_source)
        await logins.ensure(
            conductors=[str(index) for index in conductors],
            operators=[""],
            hosts=new,
            old_runtime_hosts=old,
            legacy=shared,
            exchanges=[self.spec.control_exchange],
        )

    def _security_env(self, source: Path | None) -> dict[str, str]:
        """``FLEET_SECURITY__*`` for a process on this release's code (``source`` None): older
        releases have no ``[security]`` section and refuse an unknown one."""
        logins = self.spec.logins
        if source is not None or logins is None:
            return {}
        env = logins.security_env()
        if self.spec.legacy_shared_login:
            env["FLEET_SECURITY__LEGACY_SHARED_LOGIN"] = self.spec.legacy_shared_login
            env["FLEET_SECURITY__LEGACY_HOSTS"] = ",".join(sorted(self.spec.agent_source))
        return env

    def _base_env(self, login: str | None = None, source: Path | None = None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("FLEET_") or k.startswith("FLEET_TEST_")
        }
        env.update(
            {
                "FLEET_TRANSPORT_URL": self._url_of(login),
                "FLEET_CONTROL_EXCHANGE": self.spec.control_exchange,
                "FLEET_LOG_FORMAT": "json",
                "FLEET_SERVICE__REPORT_INTERVAL": str(self.spec.report_interval),
                "FLEET_SERVICE__SERVICE_DOWN_TIME": str(self.spec.service_down_time),
                "FLEET_SERVICE__GRACEFUL_SHUTDOWN_TIMEOUT": "20",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self._security_env(source))
        env.update(
            (f"FLEET_MESSAGING__{key.upper()}", _env_value(value))
            for key, value in self.spec.messaging.items()
        )
        env.update(self.spec.common_env)
        return env

    def conductor_handle(self, index: int) -> ProcessHandle:
        name = f"conductor-{index}"
        source = self.spec.conductor_source
        env = self._base_env(self.login_of(name), source)
        env["FLEET_DATABASE_URL"] = self.spec.database_url
        env["FLEET_HOST"] = name
        if source is not None:
            env["PYTHONPATH"] = str(source)
        return ProcessHandle(
            name,
            [sys.executable, "-m", "conductor"],
            env,
            self.workdir / f"{name}.log",
            cwd=source,
        )

    def agent_handle(self, host: str) -> ProcessHandle:
        source = self.spec.agent_source.get(host)
        env = self._base_env(self.login_of(host), source)
        env.pop("FLEET_DATABASE_URL", None)  # agents never hold database credentials
        env["FLEET_HOST"] = host
        env["FLEET_STATE_DIR"] = str(self.workdir / "hypervisors")
        port = self.spec.agent_broker_port.get(host)
        if port is not None:
            env["FLEET_TRANSPORT_URL"] = _with_port(env["FLEET_TRANSPORT_URL"], port)
        env.update(self.spec.agent_env.get(host, {}))
        if source is not None:
            # The tree's packages shadow the installed ones (cwd and PYTHONPATH come first).
            env["PYTHONPATH"] = str(source)
        return ProcessHandle(
            host,
            [sys.executable, "-m", "compute_agent"],
            env,
            self.workdir / f"{host}.log",
            cwd=source,
        )


def _env_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _with_port(url: str, port: int) -> str:
    """``url`` (one broker host) with its port replaced: credentials, vhost, query kept."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    creds, at, hostport = netloc.rpartition("@")
    if "," in hostport:
        raise ValueError("agent_broker_port needs a transport URL with one broker host")
    host = hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport
    return f"{scheme}{sep}{creds}{at}{host}:{port}{slash}{tail}"
