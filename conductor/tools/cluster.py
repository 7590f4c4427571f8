"""A local Fleet cluster of real processes: one or more conductors and N compute agents.

Used by the integration tests and by ``make demo``. Every process is started from its console
entry point with its own environment (agents get no database URL), logs to its own file, and is
stopped with SIGTERM (or killed, to test recovery). The caller's process becomes an operator
client: object reads go to the conductors, actions through the compute-task API.

With ``ClusterSpec.logins`` (a ``BrokerLogins``), every process logs in to RabbitMQ as its own
user, created on demand in one batch: agent ``<host>`` as ``fleet-host-<host>``, conductor ``n`` as
``fleet-conductor-<n>``, this process (and ``fleetctl`` run for it) as ``fleet-operator`` (plus the
logins' tag, if any). Without it, every process uses ``transport_url`` as given.

All traffic stays on loopback: the broker and database URLs must point at 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog

from conductor.db import migration
from conductor.tools.cluster_environment import ClusterEnvironment, ClusterSpec, ProcessHandle
from shared_objects.base import FleetObject
from shared_objects.exception import ALLOWED_REMOTE_EXMODS
from shared_objects.objects.compute_node import ComputeNodeList
from shared_objects.objects.instance import Instance, InstanceList
from shared_objects.objects.service import ServiceList
from shared_objects.releases import BINARY_COMPUTE
from shared_objects.rpc_clients.compute_task import ComputeTaskAPI
from shared_objects.rpc_clients.conductor import ConductorAPI
from shared_objects.runtime.messaging import MessagingError, get_transport

# ClusterSpec is re-exported: the demos, bench and tests build a cluster from this module.
__all__ = ["FINAL_VM_STATES", "ClusterSpec", "LocalCluster", "local_cluster"]

log = structlog.get_logger(__name__)


FINAL_VM_STATES = frozenset({"active", "error", "stopped"})


class LocalCluster(ClusterEnvironment):
    """Start, stop, kill and restart the processes of a local cluster; talk to it."""

    async def _spawn(self, handle: ProcessHandle) -> None:
        handle.log_path.parent.mkdir(parents=True, exist_ok=True)
        logfile = await asyncio.to_thread(open, handle.log_path, "ab")
        handle.log_offset = logfile.tell()
        try:
            handle.process = await asyncio.create_subprocess_exec(
                *handle.argv,
                env=handle.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                cwd=handle.cwd,
            )
        finally:
            logfile.close()
        self.processes[handle.name] = handle
        log.info("cluster_process_started", name=handle.name, pid=handle.process.pid)

    async def start(self, *, timeout: float = 60.0) -> None:
        """Migrate the database, start conductors then agents, wait until all are up."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        await self.provision(hosts=self.spec.hosts, conductors=range(1, self.spec.conductors + 1))
        if self.spec.conductor_source is None:
            await migration.upgrade(self.spec.database_url)
        else:
            await self.migrate_database(self.spec.conductor_source)
        cfg = self._messaging_config(self.operator_login)
        self.transport = get_transport(cfg, allowed_remote_exmods=ALLOWED_REMOTE_EXMODS)
        await self.transport.connect()
        self.conductor = ConductorAPI(self.transport, timeout=30.0)
        self.tasks = ComputeTaskAPI(self.transport, timeout=60.0)
        self._previous_api = FleetObject.indirection_api
        FleetObject.indirection_api = self.conductor
        for index in range(1, self.spec.conductors + 1):
            await self._spawn(self.conductor_handle(index))
        await self.wait_conductor(timeout)
        for host in self.spec.hosts:
            await self._spawn(self.agent_handle(host))
        await self.wait_agents(self.spec.hosts, timeout)

    async def wait_conductor(self, timeout: float) -> None:
        assert self.conductor is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for name in self.processes:
                if name.startswith("conductor-"):
                    self._check_alive(name)
            try:
                await self.conductor.ping(self.ctxt, "up", wait=2.0)
                return
            except MessagingError as exc:
                if loop.time() > deadline:
                    raise TimeoutError(f"no conductor answered within {timeout}s: {exc}") from exc
                await asyncio.sleep(0.2)

    async def wait_agents(self, hosts: tuple[str, ...] | list[str], timeout: float) -> None:
        """Until each host has a service row and a ComputeNode, and its agent process (when we
        started one) has said it is ready: after a restart the rows are already there."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for host in hosts:
                self._check_alive(host)
            services = {s.host for s in await ServiceList.get_by_binary(self.ctxt, BINARY_COMPUTE)}
            nodes = {n.host for n in await ComputeNodeList.get_all(self.ctxt)}
            ready = [await self._said_ready(host) for host in hosts]
            if set(hosts) <= services & nodes and all(ready):
                # Registered; give the RPC consumer its start (ready comes right after).
                await asyncio.sleep(0.3)
                return
            if loop.time() > deadline:
                silent = [h for h, said in zip(hosts, ready, strict=True) if not said]
                raise TimeoutError(
                    f"agents {sorted(set(hosts) - (services & nodes))} not up in {timeout}s "
                    f"(services: {sorted(services)}, compute nodes: {sorted(nodes)}; "
                    f"no service_ready line from {silent}: its log level must be info or lower)"
                )
            await asyncio.sleep(0.2)

    async def _said_ready(self, name: str) -> bool:
        """Whether the current process ``name`` logged ``service_ready`` (True if not ours)."""
        handle = self.processes.get(name)
        if handle is None or handle.process is None:
            return True

        def read() -> bytes:
            with handle.log_path.open("rb") as log_file:
                log_file.seek(handle.log_offset)
                return log_file.read()

        return b'"service_ready"' in await asyncio.to_thread(read)

    def _check_alive(self, name: str) -> None:
        """Fail fast, with the log's tail, when a process died while we wait for it."""
        handle = self.processes.get(name)
        if handle is not None and handle.process is not None:
            code = handle.process.returncode
            if code is not None:
                raise RuntimeError(f"{name} exited with {code}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.processes[name].log_path
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def stop_process(self, name: str, *, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait for a clean exit (SIGKILL after ``timeout``); returns the exit code."""
        handle = self.processes[name]
        proc = handle.process
        if proc is None or proc.returncode is not None:
            return proc.returncode if proc else None
        proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return None

    async def kill_process(self, name: str) -> None:
        """SIGKILL: the process gets no chance to clean up (crash testing)."""
        proc = self.processes[name].process
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def restart_conductor(self, index: int, *, timeout: float = 60.0) -> None:
        """Start conductor ``index`` again (after a kill or stop) with the same environment."""
        name = f"conductor-{index}"
        await self._spawn(dataclasses.replace(self.processes[name], process=None))
        await self.wait_conductor(timeout)

    def pause_process(self, name: str) -> None:
        """SIGSTOP: the process stops being scheduled (a CPU-starved or frozen host)."""
        proc = self.processes[name].process
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGSTOP)

    def resume_process(self, name: str) -> None:
        """SIGCONT after ``pause_process`` (harmless on a process that is not stopped)."""
        proc = self.processes[name].process
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGCONT)

    def pid_of(self, name: str) -> int | None:
        """Process id of ``name`` while it runs."""
        handle = self.processes.get(name)
        if handle is None or not handle.running or handle.process is None:
            return None
        return handle.process.pid

    async def restart_agent(self, host: str, *, timeout: float = 60.0) -> None:
        """Start the agent of ``host`` again with the same code and environment."""
        await self._spawn(dataclasses.replace(self.processes[host], process=None))
        await self.wait_agents([host], timeout)

    async def switch_agent_code(
        self, host: str, source: Path | None, *, timeout: float = 60.0
    ) -> int | None:
        """Stop ``host``'s agent cleanly and start it on other code (None: the installed code),
        as an operator upgrading (or downgrading) one host does. Returns the old exit code."""
        code = await self.stop_process(host)
        sources = dict(self.spec.agent_source)
        if source is None:
            sources.pop(host, None)
        else:
            sources[host] = source
        self.spec = dataclasses.replace(self.spec, agent_source=sources)
        await self.provision(hosts=[host])  # its login (or its rights) may change with the code
        await self._spawn(self.agent_handle(host))
        await self.wait_agents([host], timeout)
        return code

    async def switch_conductor_code(self, source: Path | None, *, timeout: float = 60.0) -> None:
        """Restart every conductor, one by one, on other code (None: the installed code)."""
        self.spec = dataclasses.replace(self.spec, conductor_source=source)
        for name in [n for n in self.processes if n.startswith("conductor-")]:
            await self.stop_process(name)
            await self._spawn(self.conductor_handle(int(name.rsplit("-", 1)[1])))
            await self.wait_conductor(timeout)

    async def migrate_database(self, source: Path | None = None) -> None:
        """``fleetctl db upgrade`` of the given code (None: the installed code)."""
        await self.provision()  # fleetctl runs as the operator
        env = self._base_env(self.operator_login, source)
        env["FLEET_DATABASE_URL"] = self.spec.database_url
        if source is not None:
            env["PYTHONPATH"] = str(source)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            _fleetctl_module(source),
            "db",
            "upgrade",
            env=env,
            cwd=source,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"db upgrade failed: {out.decode(errors='replace')}")

    async def start_agent(self, host: str, *, timeout: float = 60.0) -> None:
        """Start an agent for a host that was not in the spec (or was stopped)."""
        await self.provision(hosts=[host])
        await self._spawn(self.agent_handle(host))
        await self.wait_agents([host], timeout)

    async def stop(self) -> dict[str, int | None]:
        """Stop agents, then conductors; returns each process's exit code."""
        codes: dict[str, int | None] = {}
        agents = [n for n in self.processes if not n.startswith("conductor-")]
        conductors = [n for n in self.processes if n.startswith("conductor-")]
        for group in (agents, conductors):
            results = await asyncio.gather(*(self.stop_process(n) for n in group))
            codes.update(zip(group, results, strict=True))
        if self.transport is not None:
            FleetObject.indirection_api = self._previous_api
            await self.transport.close()
            self.transport = None
        return codes

    async def wait_instances(
        self, uuids: list[str], *, timeout: float = 60.0, deleted: bool = False
    ) -> list[Instance]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = list(await InstanceList.get_by_uuids(self.ctxt, uuids))
            if deleted and all(i.deleted for i in found):
                return found
            if not deleted and all(
                i.vm_state in FINAL_VM_STATES and i.task_state is None for i in found
            ):
                return found
            if loop.time() > deadline:
                states = sorted({f"{i.vm_state}/{i.task_state}" for i in found})
                raise TimeoutError(f"instances not settled within {timeout}s: {states}")
            await asyncio.sleep(0.2)

    async def boot(self, **request: Any) -> list[str]:
        assert self.tasks is not None
        made = await self.tasks.build_instances(self.ctxt, **request)
        return [m["uuid"] for m in made]


@contextlib.asynccontextmanager
async def local_cluster(spec: ClusterSpec) -> AsyncIterator[LocalCluster]:
    cluster = LocalCluster(spec)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()


def _fleetctl_module(source: Path | None) -> str:
    """``python -m`` name of ``fleetctl`` in the code at ``source`` (None: this code): an earlier
    release's tree, as the upgrade tests and demo run it, may have it under its former name."""
    if source is None or (source / "conductor" / "tools" / "fleetctl").is_dir():
        return "conductor.tools.fleetctl"
    return "conductor.cli"  # releases before 1.2
