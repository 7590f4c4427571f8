"""A private, throwaway RabbitMQ cluster of three nodes on loopback, for cluster fault tests.

    async with RabbitCluster() as cluster:            # three nodes, started in parallel, joined
        await cluster.add_vhost("fleet-test")
        transport = get_transport(..., url=cluster.url_for("fleet-test"))   # all three hosts
        await cluster.kill(0)                         # SIGKILL one node (a crash)
        await cluster.restart(0)                      # same name, port and data: it rejoins
        await cluster.shutdown(1)                     # rabbitmqctl stop, data kept

Each node is a :class:`~shared_objects.testing.rabbit_node.RabbitNode` (own node name, AMQP and
distribution ports, data directory), all with one Erlang cookie. They start in parallel as
three single-node brokers; then nodes 2 and 3 ``join_cluster`` node 1 (stop_app, reset,
join_cluster, start_app). Users, vhosts, permissions and policies are cluster-wide: create them
once, through :meth:`ctl` or a ``BrokerLogins`` on :meth:`logins`, which run ``rabbitmqctl``
on whichever node is up. On exit (or a failed start) every node is SIGKILLed and its files
removed: the data is throwaway, and nothing may be left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from shared_objects.testing.rabbit_node import RabbitNode, RabbitNodeError

__all__ = ["RabbitCluster"]

# A pid as rabbitmqctl's table format prints it: <node@host.N.N.N>
_PID_NODE = re.compile(r"<([^<>.]+@[^<>.]+)\.")


class RabbitCluster:
    """Three (``size``) private RabbitMQ nodes clustered on loopback; always cleaned up."""

    def __init__(
        self,
        size: int = 3,
        *,
        extra_config: str = "",
        start_timeout: float = 90.0,
        ctl_timeout: float = 60.0,
    ) -> None:
        """Prepare (not start) the nodes; ``extra_config`` goes into every node's rabbitmq.conf
        (e.g. ``deploy/rabbitmq/20-fleet-limits.conf``: broker limits are per node)."""
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        prefix = f"fleetclu-{secrets.token_hex(3)}"
        cookie = secrets.token_hex(16).upper()
        self.nodes = [
            RabbitNode(
                name=f"{prefix}-{index}",
                cookie=cookie,
                extra_config=extra_config,
                start_timeout=start_timeout,
                ctl_timeout=ctl_timeout,
            )
            for index in range(1, size + 1)
        ]
        self.start_timeout = start_timeout
        #: Seconds the last ``start()`` took: parallel boot, joins, cluster status agreed.
        self.last_start_seconds: float | None = None
        #: Seconds the last ``restart()`` took until the node was running in the cluster again.
        self.last_restart_seconds: float | None = None
        self._down: set[int] = set()

    # -- addresses -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Transport URL listing every node (guest/guest), default vhost."""
        return self.url_for("/")

    def url_for(self, vhost: str = "/", user: str = "guest", password: str = "guest") -> str:
        """Transport URL with every node as a host (oslo's failover list) and ``vhost``."""
        creds = f"{quote(user, safe='')}:{quote(password, safe='')}"
        hosts = ",".join(f"{creds}@127.0.0.1:{node.port}" for node in self.nodes)
        path = "" if vhost == "/" else quote(vhost, safe="")
        return f"rabbit://{hosts}/{path}"

    @property
    def nodenames(self) -> list[str]:
        return [node.nodename for node in self.nodes]

    def index_of(self, nodename: str) -> int:
        """Index of the node called ``nodename`` (as rabbitmqctl prints it)."""
        return self.nodenames.index(nodename)

    # RabbitNode's surface used by BrokerLogins.for_node / NodeCtl: run on a node that is up.
    @property
    def base_dir(self) -> Path:
        return self.nodes[self.running_index()].base_dir

    def running_index(self) -> int:
        """Index of the first node this object has not killed or stopped."""
        for index in range(len(self.nodes)):
            if index not in self._down:
                return index
        raise RabbitNodeError("every node of the cluster is down")

    async def ctl(self, *args: str, within: float | None = None) -> str:
        """``rabbitmqctl <args>`` on a node that is up (cluster-wide commands: users, vhosts,
        permissions, policies, definitions, list_queues ...)."""
        return await self.nodes[self.running_index()].ctl(*args, within=within)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every node (in parallel), join them, wait until all are running together."""
        started = time.monotonic()
        try:
            # gather without return_exceptions would leave the others starting when one fails;
            # with it every start has ended (up or cleaned up) before we decide.
            results = await asyncio.gather(
                *(node.start() for node in self.nodes), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
            seed = self.nodes[0].nodename
            joins = await asyncio.gather(
                *(self._join(node, seed) for node in self.nodes[1:]), return_exceptions=True
            )
            errors = [r for r in joins if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
            await self.wait_running(range(len(self.nodes)), self.start_timeout)
        except BaseException:
            await self.stop()
            raise
        self.last_start_seconds = time.monotonic() - started

    @staticmethod
    async def _join(node: RabbitNode, seed: str) -> None:
        await node.ctl("stop_app")
        await node.ctl("reset")
        await node.ctl("join_cluster", seed)
        await node.ctl("start_app")

    async def stop(self) -> None:
        """SIGKILL every node and delete its files (a throwaway cluster: no graceful stop)."""
        results = await asyncio.gather(
            *(self._discard(node) for node in self.nodes), return_exceptions=True
        )
        self._down = set(range(len(self.nodes)))
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    @staticmethod
    async def _discard(node: RabbitNode) -> None:
        try:
            await node.kill()
        finally:
            await node.stop()  # no process left: only removes the files

    async def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (a crash); its data stays for :meth:`restart`."""
        self._down.add(index)
        await self.nodes[index].kill()

    async def shutdown(self, index: int) -> None:
        """Stop node ``index`` gracefully (``rabbitmqctl stop``), keeping its data."""
        self._down.add(index)
        await self.nodes[index].shutdown()

    async def restart(self, index: int, within: float | None = None) -> None:
        """Start node ``index`` again after :meth:`kill` or :meth:`shutdown` (same name, ports
        and data) and wait until the others see it running in the cluster."""
        started = time.monotonic()
        await self.nodes[index].revive()
        self._down.discard(index)
        await self.wait_running([index], within or self.start_timeout)
        self.last_restart_seconds = time.monotonic() - started

    async def __aenter__(self) -> RabbitCluster:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- what the cluster says -------------------------------------------------------------------

    async def running_nodes(self) -> list[str]:
        """Node names a running node reports as running members of the cluster."""
        status = json.loads(_json_part(await self.ctl("cluster_status", "--formatter", "json")))
        return list(status.get("running_nodes", []))

    async def wait_running(self, indexes: Sequence[int] | range, within: float) -> None:
        """Until every node of ``indexes`` is reported running in the cluster."""
        want = {self.nodes[i].nodename for i in indexes}
        deadline = time.monotonic() + within
        while True:
            with contextlib.suppress(RabbitNodeError, TimeoutError, ValueError):
                if want <= set(await self.running_nodes()):
                    return
            if time.monotonic() > deadline:
                raise RabbitNodeError(f"nodes {sorted(want)} not running after {within} s")
            await asyncio.sleep(0.5)

    async def queues(self, vhost: str) -> list[dict[str, str]]:
        """``list_queues`` of ``vhost``: name, type, consumers, messages, and the node of the
        queue's leader (quorum) or process (classic) as ``node``."""
        columns = ("name", "type", "consumers", "messages", "leader", "pid")
        rows = await self._table(["list_queues", "-p", vhost], columns)
        for row in rows:
            row["node"] = row["leader"] or _pid_node(row["pid"])
        return rows

    async def consumers(self, vhost: str) -> list[dict[str, str]]:
        """``list_consumers`` of ``vhost`` with the node of each consumer's channel (``node``):
        the node its connection is on."""
        rows = await self._table(["list_consumers", "-p", vhost], ("queue_name", "channel_pid"))
        for row in rows:
            row["node"] = _pid_node(row["channel_pid"])
        return rows

    async def connections(self) -> list[dict[str, str]]:
        """``list_connections``: user, vhost and the ``node`` each connection is on."""
        rows = await self._table(["list_connections"], ("user", "vhost", "pid"))
        for row in rows:
            row["node"] = _pid_node(row["pid"])
        return rows

    async def _table(self, command: list[str], columns: Sequence[str]) -> list[dict[str, str]]:
        # The table format, not JSON: only it prints pids with their node's name.
        text = await self.ctl(*command, *columns, "-q", "--no-table-headers")
        return [
            dict(zip(columns, line.split("\t"), strict=False))
            for line in text.splitlines()
            if line.strip()
        ]


def _json_part(text: str) -> str:
    """rabbitmqctl may print a banner before its JSON."""
    return text[text.index("{") :]


def _pid_node(pid: str) -> str:
    match = _PID_NODE.search(pid)
    return match.group(1) if match else ""
