"""What each compute agent in the fleet understands, so nobody is sent what it does not know.

During a rolling upgrade agents of two releases run side by side. Two things follow from the
live compute services' rows (their ``version`` is the release's service version):

* the compute RPC **version cap**: the API version of the oldest live agent's release, so a call
  between any two agents (a live migration from a new source to an old destination) uses only
  what both speak. ``[upgrade_levels] compute`` = ``auto`` (the default) computes it; a release
  name or an RPC version pins it by hand.
* each host's **object manifest**: objects sent to a host are serialised at the versions of
  that host's release.

The levels are read in one query, cached, refreshed on a timer and on demand (SIGHUP); every
change of the cap is logged.

That query reads every compute service, so an agent refreshing on a timer would cost the
conductors O(hosts) per agent per interval, O(hosts²) for the fleet, for levels an agent only
needs when it calls a peer (live migration). Agents therefore refresh ``on_demand``: once at
start, then only when the levels are used after ``refresh_interval`` has passed (in the
background: that call uses what was last read, as a timer's refresh would have; a host not
seen yet still gets the oldest release's versions).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog

from shared_objects import releases
from shared_objects.objects.service import ServiceList
from shared_objects.releases import Release

log = structlog.get_logger(__name__)

ContextFactory = Callable[[], contextlib.AbstractAsyncContextManager[Any]]


# At most one refresh for unseen hosts per this many seconds.
_UNSEEN_REFRESH_SPACING = 2.0


class UnknownUpgradeLevel(ValueError):
    """A pinned level that names no known release or compute RPC version."""


def parse_level(value: str) -> Release | None:
    """``auto`` → None; a release name, or a compute RPC version, → that (newest) release."""
    if value == "auto":
        return None
    for release in reversed(releases.RELEASES):
        if release.name == value:
            return release
    for release in reversed(releases.RELEASES):
        if release.compute_rpc_api == value:
            return release
    known = ", ".join(r.name for r in releases.RELEASES)
    raise UnknownUpgradeLevel(f"upgrade level {value!r} is not a known release ({known})")


@dataclasses.dataclass(frozen=True, slots=True)
class Levels:
    """A snapshot: the release every call must stay within, and each host's own release."""

    cap: Release
    hosts: dict[str, Release]
    pinned: bool = False

    @property
    def rpc_version_cap(self) -> str:
        return self.cap.compute_rpc_api

    def release_for(self, host: str) -> Release:
        # A host not seen yet (registered after the last refresh) may run any supported
        # release: send it the oldest one's versions until the next refresh knows better.
        return self.hosts.get(host, releases.RELEASES[0])


def compute_levels(
    services: Any, *, now: datetime.datetime, service_down_time: float, pinned: Release | None
) -> Levels:
    """Levels from the compute services' rows (pure, for tests)."""
    hosts: dict[str, Release] = {}
    live: list[Release] = []
    for svc in services:
        release = releases.for_service_version(svc.version)
        hosts[svc.host] = release
        if svc.is_up_at(now, service_down_time):
            live.append(release)
    if pinned is not None:
        return Levels(pinned, hosts, pinned=True)
    # No live agent yet: stay at the oldest supported release until one reports (an old agent
    # starting right after this refresh must not be sent what it does not know).
    cap = min(live, key=lambda r: r.service_version) if live else releases.RELEASES[0]
    return Levels(cap, hosts)


class ComputeUpgradeLevels:
    """The cached levels of one process, with a refresh task."""

    def __init__(
        self,
        setting: str,
        context_factory: ContextFactory,
        *,
        service_down_time: float = 60.0,
        refresh_interval: float = 30.0,
        on_demand: bool = False,
    ) -> None:
        self.pinned = parse_level(setting)
        self.on_demand = on_demand
        self._read_at = -float("inf")
        self._context_factory = context_factory
        self.service_down_time = service_down_time
        self.refresh_interval = refresh_interval
        self._levels = Levels(
            self.pinned or releases.RELEASES[0], {}, pinned=self.pinned is not None
        )
        self._task: asyncio.Task[None] | None = None
        # A refresh started because a host was asked about before any refresh had seen it.
        self._unseen_refresh: asyncio.Task[None] | None = None
        self._unseen_refresh_at = 0.0
        self._refreshed = False

    @property
    def levels(self) -> Levels:
        """The levels as last read (on demand: a stale read starts a refresh)."""
        if self.on_demand and self._refreshed and not self._levels.pinned:
            try:
                now = asyncio.get_running_loop().time()
            except RuntimeError:  # read outside the event loop (tests): nothing to start
                return self._levels
            if now - self._read_at >= self.refresh_interval:
                self._refresh_soon(spacing=0.0)
        return self._levels

    @levels.setter
    def levels(self, value: Levels) -> None:
        self._levels = value

    async def refresh(self) -> Levels:
        """Read the compute services now and apply the result."""
        self._read_at = asyncio.get_running_loop().time()
        async with self._context_factory() as ctxt:
            services = await ServiceList.get_by_binary(
                ctxt, releases.BINARY_COMPUTE, include_disabled=True
            )
        new = compute_levels(
            services,
            now=datetime.datetime.now(datetime.UTC),
            service_down_time=self.service_down_time,
            pinned=self.pinned,
        )
        # Logged when the cap or any host's release changes (a host appears, upgrades, goes):
        # what an operator needs to follow a rolling upgrade, and quiet otherwise.
        old = self._levels
        if new.cap != old.cap or new.hosts != old.hosts or not self._refreshed:
            log.info(
                "compute_rpc_version_cap",
                cap=new.rpc_version_cap,
                release=new.cap.name,
                pinned=new.pinned,
                hosts={h: r.name for h, r in sorted(new.hosts.items())},
            )
        self.levels = new
        self._refreshed = True
        return new

    def release_for(self, host: str) -> Release:
        """``host``'s release as last read. A host registered after the last refresh gets the
        oldest release's versions (always safe) and starts a refresh in the background, so a
        new host is sent its own versions within a moment instead of a whole interval."""
        levels = self.levels
        if host not in levels.hosts and not levels.pinned:
            self._refresh_soon()
        return levels.release_for(host)

    def _refresh_soon(self, spacing: float = _UNSEEN_REFRESH_SPACING) -> None:
        if self._unseen_refresh is not None and not self._unseen_refresh.done():
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._unseen_refresh_at < spacing:
            return  # a host that never registers must not turn every call into a refresh
        self._unseen_refresh_at = loop.time()
        self._unseen_refresh = loop.create_task(self._refresh_quietly(), name="levels-unseen")

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # stale levels are safe; the periodic refresh tries again
            log.warning("compute_levels_refresh_failed", error=f"{type(exc).__name__}: {exc}")

    async def start(self) -> None:
        if self.on_demand:
            # Nothing read at start: a read lists every compute service, so agents reading at
            # start made a fleet's (re)start cost the conductors O(hosts²) (1,000 agents
            # starting read ~500,000 rows). The first use waits for one (``ensure_read``).
            return
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="upgrade-levels-refresh")

    async def ensure_read(self) -> None:
        """Before a use that must not go out with guessed levels: wait for the first read
        (one read however many callers wait; a failed read is tried again by the next use,
        and meanwhile the oldest release's versions, which are always safe, are used)."""
        if self._refreshed or self._levels.pinned:
            return
        if self._unseen_refresh is None or self._unseen_refresh.done():
            loop = asyncio.get_running_loop()
            self._unseen_refresh_at = loop.time()
            self._unseen_refresh = loop.create_task(self._refresh_quietly(), name="levels-first")
        await asyncio.shield(self._unseen_refresh)

    async def stop(self) -> None:
        if self._unseen_refresh is not None:
            self._unseen_refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._unseen_refresh
            self._unseen_refresh = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Keep the last known levels: stale is safe (it only lifts later).
                log.warning("compute_levels_refresh_failed", exc_info=True)


@contextlib.asynccontextmanager
async def plain_context() -> AsyncIterator[Any]:
    """Context factory for processes whose object calls go to the conductor."""
    from shared_objects.context import admin_context

    yield admin_context("upgrade-levels")
