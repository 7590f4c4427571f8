"""A private, throwaway RabbitMQ node for fault tests (broker restart, broker kill).

The shared broker on 127.0.0.1:5672 is used by everyone on the machine and must never be
stopped; a test that needs to restart or kill "the broker" starts its own node with this class::

    async with RabbitNode() as node:
        transport = get_transport(..., url=node.url)
        ...
        await node.restart_app()     # rabbitmqctl stop_app + start_app
        await node.kill()            # SIGKILL the VM
        await node.revive()          # the same node again: name, port, data, users

Several nodes sharing a ``cookie`` can be clustered (``rabbit_cluster.RabbitCluster`` does).

Isolation: its own node name (``fleettest-<rand>@localhost``), AMQP port and distribution port
(free ephemeral ports, loopback only), data/log/config directories and Erlang cookie in a temp
directory that is removed afterwards. Only epmd (127.0.0.1:4369) is shared, which is harmless:
every node registers under its own name. Plugins are disabled so that e.g. the management
listener of the shared node's configuration is never started twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["RabbitNode", "RabbitNodeError", "free_port"]

# The Debian wrappers in /usr/sbin switch to the ``rabbitmq`` user (and its cookie); the scripts
# below do not, so the node and its CLI calls share the cookie we put in our private $HOME.
_RABBIT_BIN = Path(os.environ.get("FLEET_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))

# AMQP 0-9-1 protocol header; a ready broker answers with a Connection.Start method frame.
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


class RabbitNodeError(RuntimeError):
    """The private node could not be started, controlled or stopped."""


def free_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RabbitNode:
    """One private RabbitMQ node on loopback, started and always cleaned up by its owner."""

    def __init__(
        self,
        *,
        start_timeout: float = 60.0,
        ctl_timeout: float = 60.0,
        extra_config: str = "",
        port: int | None = None,
        plugins: Sequence[str] = (),
        name: str | None = None,
        cookie: str | None = None,
    ) -> None:
        """Prepare (not start) a node; ``extra_config`` is appended to its rabbitmq.conf,
        ``plugins`` are enabled at boot (e.g. ``rabbitmq_auth_mechanism_ssl``).

        ``port`` reuses a known AMQP port, e.g. to replace a killed node by a fresh one that
        clients reconnect to; by default a free ephemeral port is picked. ``name`` is the node
        name's prefix (``<name>@localhost``; default ``fleettest-<rand>``); ``cookie`` the Erlang
        cookie (default: a random one), the same for nodes meant to form a cluster.
        """
        self.nodename = f"{name or f'fleettest-{secrets.token_hex(4)}'}@localhost"
        self.cookie = cookie or secrets.token_hex(16).upper()
        self.port = port if port is not None else free_port()
        self.dist_port = free_port()
        self.start_timeout = start_timeout
        self.ctl_timeout = ctl_timeout
        self._extra_config = extra_config
        self._plugins = tuple(plugins)
        self._base: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        #: Seconds the last ``start()`` took until the AMQP listener answered.
        self.last_start_seconds: float | None = None

    @property
    def url(self) -> str:
        """Transport URL of this node (guest/guest on loopback)."""
        return f"rabbit://guest:guest@127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int | None:
        """Process id of the node's process group leader, while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def base_dir(self) -> Path:
        """Temp directory holding this node's data, logs, config and cookie."""
        if self._base is None:
            raise RabbitNodeError("node not started")
        return self._base

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the node and wait until its AMQP listener answers; clean up if that fails."""
        if self._proc is not None:
            raise RabbitNodeError("node already started")
        if not (_RABBIT_BIN / "rabbitmq-server").exists():
            raise RabbitNodeError(
                f"{_RABBIT_BIN}/rabbitmq-server not found: install rabbitmq-server "
                "(make services does) or set "
                "FLEET_RABBITMQ_BIN to the directory holding rabbitmq-server and rabbitmqctl"
            )
        self._base = Path(tempfile.mkdtemp(prefix="fleet-rabbit-"))
        env = self._prepare_environment(self._base)
        await self._launch(env)

    async def revive(self) -> None:
        """Start the node again after ``kill()`` or ``shutdown()``, on the same port, data and
        users: a broker coming back (durable queues, logins, permissions and its cluster
        membership survive; the rest is lost)."""
        if self._proc is not None:
            raise RabbitNodeError("node is running: kill() or shutdown() it first")
        env = self._prepare_environment(self.base_dir, write_files=False)
        await self._launch(env)

    async def _launch(self, env: dict[str, str]) -> None:
        assert self._base is not None
        server_script = _RABBIT_BIN / "rabbitmq-server"
        started = time.monotonic()
        log = (self._base / "server.out").open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                str(server_script),
                env=env,
                cwd=str(self._base),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                # Own process group: kill() takes the shell wrapper and the Erlang VM together.
                start_new_session=True,
            )
        finally:
            log.close()
        try:
            await self.wait_ready(self.start_timeout)
        except BaseException:
            await self._terminate()
            self._remove_files()
            raise
        self.last_start_seconds = time.monotonic() - started

    async def stop(self) -> None:
        """Stop the node (gracefully if possible, else SIGKILL) and delete its files."""
        try:
            await self.shutdown()
        finally:
            self._remove_files()

    async def shutdown(self, within: float = 30.0) -> None:
        """Stop the node gracefully (``rabbitmqctl stop``; SIGKILL if that fails or takes
        longer than ``within``), keeping its files: ``revive()`` starts it again."""
        if self._proc is not None and self._proc.returncode is None:
            try:
                await self.ctl("stop", within=within)
            except (RabbitNodeError, TimeoutError):
                pass  # fall through to the hard kill below
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait(), 15.0)
        await self._terminate()

    async def kill(self) -> None:
        """SIGKILL the node's VM (a crash, not a shutdown); files stay until ``stop()``."""
        await self._terminate()

    async def stop_app(self) -> None:
        """``rabbitmqctl stop_app``: the broker closes every connection, the VM keeps running."""
        await self.ctl("stop_app")

    async def start_app(self) -> None:
        """``rabbitmqctl start_app``, then wait until the AMQP listener answers again."""
        await self.ctl("start_app")
        await self.wait_ready(self.start_timeout)

    async def restart_app(self, down_for: float = 0.0) -> None:
        """Restart the broker application, staying down for ``down_for`` seconds in between."""
        await self.stop_app()
        if down_for > 0:
            await asyncio.sleep(down_for)
        await self.start_app()

    async def ctl(self, *args: str, within: float | None = None) -> str:
        """Run ``rabbitmqctl -n <node> <args>`` against this node and return its output."""
        env = self._prepare_environment(self.base_dir, write_files=False)
        proc = await asyncio.create_subprocess_exec(
            str(_RABBIT_BIN / "rabbitmqctl"),
            "-n",
            self.nodename,
            *args,
            env=env,
            cwd=str(self.base_dir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), within or self.ctl_timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise RabbitNodeError(
                f"rabbitmqctl {' '.join(args)} failed ({proc.returncode}): {text}"
            )
        return text

    async def wait_ready(self, within: float) -> None:
        """Wait until the AMQP port answers the protocol header with a Connection.Start frame."""
        deadline = time.monotonic() + within
        while True:
            if self._proc is not None and self._proc.returncode is not None:
                raise RabbitNodeError(f"node exited ({self._proc.returncode}): {self._tail_logs()}")
            if await self._amqp_answers():
                return
            if time.monotonic() > deadline:
                raise RabbitNodeError(f"node not ready after {within} s: {self._tail_logs()}")
            await asyncio.sleep(0.1)

    async def __aenter__(self) -> RabbitNode:
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

    def _prepare_environment(self, base: Path, *, write_files: bool = True) -> dict[str, str]:
        home = base / "home"
        config = base / "rabbitmq.conf"
        env_file = base / "rabbitmq-env.conf"
        plugins = base / "enabled_plugins"
        if write_files:
            for sub in ("home", "mnesia", "log"):
                (base / sub).mkdir(parents=True, exist_ok=True)
            cookie = home / ".erlang.cookie"
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)
            config.write_text(
                f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
                "loopback_users = none\n"
                "log.console = false\n"
                f"{self._extra_config}\n"
            )
            # An empty env file: /etc/rabbitmq/rabbitmq-env.conf names the shared node.
            env_file.write_text("")
            plugins.write_text(f"[{','.join(self._plugins)}].\n")
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_"))
        }
        env.update(
            HOME=str(home),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_CONFIG_FILE=str(config),
            RABBITMQ_CONF_ENV_FILE=str(env_file),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(plugins),
            RABBITMQ_PID_FILE=str(base / "node.pid"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            # Keep Erlang distribution (node <-> rabbitmqctl) on loopback too.
            ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    async def _amqp_answers(self) -> bool:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port), 1.0
            )
        except (OSError, TimeoutError):
            return False
        try:
            writer.write(_AMQP_HEADER)
            await writer.drain()
            frame = await asyncio.wait_for(reader.read(7), 2.0)
            # Frame type 1 (method) on channel 0 = Connection.Start.
            return len(frame) >= 3 and frame[0] == 1
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 10.0)
        self._proc = None

    def _remove_files(self) -> None:
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None

    def _tail_logs(self, limit: int = 2000) -> str:
        if self._base is None:
            return ""
        parts = []
        for path in [self._base / "server.out", *sorted((self._base / "log").glob("*.log"))]:
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-limit:]}")
        return "\n".join(parts)
