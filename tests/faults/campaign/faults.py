"""The faults, injected one per cluster while the workload runs.

``inject`` returns when the fault is over (the broker is back, the killed agent is up again, the
partition healed, the starvation ended): recovery time is counted from then. A fault that
waits for a moment (an instance spawning, a migration copying) gives up after ``TRIGGER_WITHOUT``
seconds and strikes anyway, saying so in its note.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
from typing import Protocol

from sqlalchemy import text

from campaign.env import PROXIED_HOST, Phase

TRIGGER_WITHOUT = 30.0
#: Seconds after the workload starts at which a fault with no trigger strikes.
STRIKE_AT = 1.0


class Fault(Protocol):
    @property
    def name(self) -> str: ...

    def describe(self) -> str: ...

    async def inject(self, phase: Phase) -> str:
        """Inject the fault, return once it is over; a note for the report (may be empty)."""
        ...


@dataclasses.dataclass
class BrokerRestart:
    """``rabbitmqctl stop_app``, down for a while, ``start_app``: every connection drops."""

    down_for: float = 3.0
    name: str = "broker restart"

    def describe(self) -> str:
        return f"stop_app/start_app, down {self.down_for:g} s"

    async def inject(self, phase: Phase) -> str:
        await asyncio.sleep(STRIKE_AT)
        await phase.node.restart_app(down_for=self.down_for)
        return ""


@dataclasses.dataclass
class BrokerKill:
    """SIGKILL of the broker's VM, revived on the same port and data after a while."""

    down_for: float = 2.0
    name: str = "broker SIGKILL"

    def describe(self) -> str:
        return f"SIGKILL, revived after {self.down_for:g} s"

    async def inject(self, phase: Phase) -> str:
        await asyncio.sleep(STRIKE_AT)
        await phase.node.kill()
        await asyncio.sleep(self.down_for)
        await phase.node.revive()
        return ""


@dataclasses.dataclass
class ConductorKill:
    """SIGKILL of one conductor of two; it stays dead (the other must carry on alone)."""

    index: int = 1
    name: str = "conductor SIGKILL"

    def describe(self) -> str:
        return f"SIGKILL conductor-{self.index} of 2, not restarted"

    async def inject(self, phase: Phase) -> str:
        await asyncio.sleep(STRIKE_AT)
        await phase.cluster.kill_process(f"conductor-{self.index}")
        return ""


@dataclasses.dataclass
class AgentKillMidBuild:
    """SIGKILL of an agent while one of its instances is spawning; restarted after a while."""

    down_for: float = 1.0
    name: str = "agent SIGKILL mid-build"

    def describe(self) -> str:
        return f"SIGKILL the agent of a spawning instance, restarted after {self.down_for:g} s"

    async def inject(self, phase: Phase) -> str:
        host, note = await _wait_for_host(
            phase,
            "SELECT host FROM instances WHERE task_state = 'spawning' AND host IS NOT NULL "
            "AND deleted = false ORDER BY updated_at DESC LIMIT 1",
            fallback="compute-1",
        )
        await _kill_and_restart(phase, host, self.down_for)
        return f"killed {host}" + note


@dataclasses.dataclass
class AgentKillMidMigration:
    """SIGKILL of the source (or destination) agent of a migration that is copying memory."""

    side: str = "source"
    down_for: float = 1.0

    @property
    def name(self) -> str:
        return f"agent SIGKILL mid-migration ({self.side})"

    def describe(self) -> str:
        return f"SIGKILL the {self.side} of a copying migration, back after {self.down_for:g} s"

    async def inject(self, phase: Phase) -> str:
        column = "source_compute" if self.side == "source" else "dest_compute"
        host, note = await _wait_for_host(
            phase,
            f"SELECT {column} FROM migrations WHERE status = 'running' "
            f"AND {column} IS NOT NULL LIMIT 1",
            fallback="compute-1",
        )
        await _kill_and_restart(phase, host, self.down_for)
        return f"killed {host}" + note


@dataclasses.dataclass
class PostgresRestart:
    """A fast restart of PostgreSQL: every session is cut, new ones are refused meanwhile."""

    down_for: float = 3.0
    name: str = "PostgreSQL restart"

    def describe(self) -> str:
        return f"pg_ctl stop -m fast, down {self.down_for:g} s"

    async def inject(self, phase: Phase) -> str:
        await asyncio.sleep(STRIKE_AT)
        assert phase.infra.postgres is not None
        await phase.infra.postgres.restart(down_for=self.down_for)
        return ""


@dataclasses.dataclass
class AgentPartition:
    """One agent cut off from the broker: a blackhole (sockets open, no bytes), then every
    connection reset and the link healed."""

    blackhole_for: float = 12.0
    host: str = PROXIED_HOST
    name: str = "agent partitioned"

    def describe(self) -> str:
        return f"{self.host} blackholed {self.blackhole_for:g} s, then reset"

    async def inject(self, phase: Phase) -> str:
        await asyncio.sleep(STRIKE_AT)
        phase.proxy.blackhole()
        try:
            await asyncio.sleep(self.blackhole_for)
            phase.proxy.reset()
        finally:
            phase.proxy.heal()
        return ""


@dataclasses.dataclass
class SlowConductor:
    """One conductor CPU-starved: SIGSTOP for ``stopped`` of every ``period`` seconds (it runs
    at a fraction of a core, heartbeats late, answers slowly) for ``duration`` seconds."""

    index: int = 1
    duration: float = 15.0
    period: float = 1.0
    stopped: float = 0.8
    name: str = "slow conductor"

    def describe(self) -> str:
        share = 100 * (1 - self.stopped / self.period)
        return f"conductor-{self.index} at {share:.0f}% CPU (SIGSTOP/SIGCONT) {self.duration:g} s"

    async def inject(self, phase: Phase) -> str:
        name = f"conductor-{self.index}"
        loop = asyncio.get_running_loop()
        await asyncio.sleep(STRIKE_AT)
        end = loop.time() + self.duration
        try:
            while loop.time() < end:
                phase.cluster.pause_process(name)
                await asyncio.sleep(self.stopped)
                phase.cluster.resume_process(name)
                await asyncio.sleep(self.period - self.stopped)
        finally:
            phase.cluster.resume_process(name)
        return ""


async def _wait_for_host(phase: Phase, query: str, *, fallback: str) -> tuple[str, str]:
    """The host the query names as soon as it names one; ``fallback`` after a while."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TRIGGER_WITHOUT
    while loop.time() < deadline:
        with contextlib.suppress(Exception):  # keep polling through a transient error
            async with phase.database.engine.connect() as conn:
                host = (await conn.execute(text(query))).scalar()
            if host:
                return str(host), ""
        await asyncio.sleep(0.05)
    return fallback, f" (trigger not seen in {TRIGGER_WITHOUT:.0f} s)"


async def _kill_and_restart(phase: Phase, host: str, down_for: float) -> None:
    await phase.cluster.kill_process(host)
    await asyncio.sleep(down_for)
    await phase.cluster.restart_agent(host)


def signal_all(phase: Phase, sig: signal.Signals) -> None:
    """Send ``sig`` to every live process of the cluster (SIGUSR2: each logs a task report)."""
    for name in list(phase.cluster.processes):
        pid = phase.cluster.pid_of(name)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def full_plan() -> list[Fault]:
    """Every fault, in the order the issue lists them (plus the destination-side kill)."""
    return [
        BrokerRestart(),
        BrokerKill(),
        ConductorKill(),
        AgentKillMidBuild(),
        AgentKillMidMigration("source"),
        AgentKillMidMigration("destination"),
        PostgresRestart(),
        AgentPartition(),
        SlowConductor(),
    ]


def quick_plan() -> list[Fault]:
    """One fault of each kind, shorter where the length is ours to choose."""
    return [
        BrokerRestart(down_for=2.0),
        BrokerKill(down_for=1.0),
        ConductorKill(),
        AgentKillMidBuild(),
        AgentKillMidMigration("source"),
        PostgresRestart(down_for=2.0),
        AgentPartition(blackhole_for=10.0),
        SlowConductor(duration=8.0),
    ]
