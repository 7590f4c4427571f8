"""Host selection for builds and live migrations.

Filters drop hosts that cannot take a request (service down or disabled, not enough free vCPU,
RAM or disk under the allocation ratios); the weigher orders the rest by free RAM. A request for
several instances is spread: each pick consumes the chosen host's capacity in a local view, so
the next instance sees the host as it will be, not as it was.

The states given are never changed: they may be the conductor's cached host view
(``conductor.host_view``), shared by concurrent requests. A pick copies the host it consumes;
a request costs O(hosts) comparisons and O(picks) copies.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
from collections.abc import Iterable, Sequence

from shared_objects.exception import NoValidHost


@dataclasses.dataclass(slots=True)
class ResourceRequest:
    """What one instance needs."""

    vcpus: int
    memory_mb: int
    disk_gb: int


@dataclasses.dataclass(slots=True)
class HostState:
    """A host's capacity and usage as the scheduler sees it (from its ComputeNode and Service)."""

    host: str
    node: str
    vcpus: int
    memory_mb: int
    local_gb: int
    vcpus_used: int = 0
    memory_mb_used: int = 0
    local_gb_used: int = 0
    cpu_allocation_ratio: float = 16.0
    ram_allocation_ratio: float = 1.5
    disk_allocation_ratio: float = 1.0
    service_up: bool = True
    service_disabled: bool = False

    @property
    def free_vcpus(self) -> float:
        return self.vcpus * self.cpu_allocation_ratio - self.vcpus_used

    @property
    def free_ram_mb(self) -> float:
        return self.memory_mb * self.ram_allocation_ratio - self.memory_mb_used

    @property
    def free_disk_gb(self) -> float:
        return self.local_gb * self.disk_allocation_ratio - self.local_gb_used

    def consume(self, req: ResourceRequest) -> None:
        self.vcpus_used += req.vcpus
        self.memory_mb_used += req.memory_mb
        self.local_gb_used += req.disk_gb


@dataclasses.dataclass(frozen=True, slots=True)
class Rejection:
    """Why one host was filtered out; collected for the no-valid-host fault."""

    host: str
    reason: str


def _no_valid_host(rejected: Sequence[Rejection], placed: str = "") -> NoValidHost:
    """The shared ``NoValidHost``, naming why each host was dropped."""
    reasons = "; ".join(f"{r.host}: {r.reason}" for r in rejected) or "no compute hosts"
    return NoValidHost(placed=placed, reasons=reasons)


def _rejection(state: HostState, req: ResourceRequest) -> str | None:
    if not state.service_up:
        return "compute service is down"
    if state.service_disabled:
        return "compute service is disabled"
    if state.free_vcpus < req.vcpus:
        return f"not enough vCPU (free {state.free_vcpus:g}, need {req.vcpus})"
    if state.free_ram_mb < req.memory_mb:
        return f"not enough RAM (free {state.free_ram_mb:g} MB, need {req.memory_mb} MB)"
    if state.free_disk_gb < req.disk_gb:
        return f"not enough disk (free {state.free_disk_gb:g} GB, need {req.disk_gb} GB)"
    return None


def filter_hosts(
    hosts: Iterable[HostState], req: ResourceRequest, *, ignore_hosts: Iterable[str] = ()
) -> tuple[list[HostState], list[Rejection]]:
    """Split hosts into those that can take ``req`` and the reasons the others cannot."""
    ignored = set(ignore_hosts)
    passed: list[HostState] = []
    rejected: list[Rejection] = []
    for state in hosts:
        if state.host in ignored:
            rejected.append(Rejection(state.host, "excluded by the request"))
            continue
        reason = _rejection(state, req)
        if reason is None:
            passed.append(state)
        else:
            rejected.append(Rejection(state.host, reason))
    return passed, rejected


def weight_key(state: HostState) -> tuple[float, str]:
    """The weigher's order: smaller is better (most free RAM first, then the host name)."""
    return (state.memory_mb_used - state.memory_mb * state.ram_allocation_ratio, state.host)


def weigh(hosts: Iterable[HostState], best: int | None = None) -> list[HostState]:
    """Most free RAM first; host name breaks ties so the order is deterministic. ``best``:
    only that many from the top (no full sort)."""
    if best is None:
        return sorted(hosts, key=weight_key)
    return heapq.nsmallest(best, hosts, key=weight_key)


def select_destinations(
    hosts: Sequence[HostState],
    req: ResourceRequest,
    count: int,
    *,
    alternates: int = 2,
    ignore_hosts: Iterable[str] = (),
    force_host: str | None = None,
    floors: Sequence[tuple[float, str]] | None = None,
) -> list[list[HostState]]:
    """Pick a host for each of ``count`` instances, each followed by up to ``alternates`` others.

    Consumes capacity in copies of the hosts it picks (``hosts`` is left as it was), so a
    multi-instance request spreads. Raises ``NoValidHost`` when any instance cannot be placed.

    ``floors``: ``hosts`` were in weigher order when ``floors[i]`` was host ``i``'s
    ``weight_key``, and no key has become smaller since (usage only grows: placements consume).
    The search then stops as soon as no later host can beat those found: a few hosts looked at
    instead of all of them (the host view hands its states out that way).
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    view = list(hosts)
    if force_host is not None:
        floors = None
        view = [h for h in view if h.host == force_host]
        if not view:
            raise _no_valid_host([Rejection(force_host, "forced host is not a known compute host")])
    ignored = frozenset(ignore_hosts)
    picks: list[list[HostState]] = []
    for index in range(count):
        if floors is not None:
            ranked = _best_ordered(view, floors, req, ignored, 1 + alternates)
        else:
            ranked = _best(view, req, ignored, 1 + alternates)
        if not ranked:
            # The reasons are collected only now, for the error (the slow path).
            _passed, rejected = filter_hosts(view, req, ignore_hosts=ignored)
            placed = f"placed {index} of {count} instances. " if index else ""
            raise _no_valid_host(rejected, placed)
        position, chosen = ranked[0]
        # A copy, consumed: the given states stay untouched (a copy made by an earlier pick
        # of this call is copied again, which is as cheap and keeps this simple).
        chosen = view[position] = dataclasses.replace(chosen)
        chosen.consume(req)
        picks.append([dataclasses.replace(chosen), *(h for _, h in ranked[1:])])
    return picks


def _best(
    view: Sequence[HostState], req: ResourceRequest, ignored: frozenset[str], best: int
) -> list[tuple[int, HostState]]:
    """The ``best`` hosts of ``view`` that pass the filters, in weigher order, with their
    positions. The same tests and order as ``filter_hosts`` and ``weigh``, written out in
    one pass: it runs over every host for every instance placed."""
    v, m, d = req.vcpus, req.memory_mb, req.disk_gb
    candidates = [
        (s.memory_mb_used - s.memory_mb * s.ram_allocation_ratio, s.host, i)
        for i, s in enumerate(view)
        if s.service_up
        and not s.service_disabled
        and s.vcpus * s.cpu_allocation_ratio - s.vcpus_used >= v
        and s.memory_mb * s.ram_allocation_ratio - s.memory_mb_used >= m
        and s.local_gb * s.disk_allocation_ratio - s.local_gb_used >= d
        and s.host not in ignored
    ]
    return [(i, view[i]) for _, _, i in heapq.nsmallest(best, candidates)]


def _best_ordered(
    view: Sequence[HostState],
    floors: Sequence[tuple[float, str]],
    req: ResourceRequest,
    ignored: frozenset[str],
    best: int,
) -> list[tuple[int, HostState]]:
    """``_best`` over hosts in weigher order (see ``select_destinations``): every host after
    position ``i`` weighs at least ``floors[i]``, so once ``best`` hosts that pass weigh no more
    than that, nothing later can displace them."""
    v, m, d = req.vcpus, req.memory_mb, req.disk_gb
    found: list[tuple[float, str, int]] = []
    for i, s in enumerate(view):
        if len(found) >= best and found[-1][:2] <= floors[i]:
            break
        if (
            s.service_up
            and not s.service_disabled
            and s.vcpus * s.cpu_allocation_ratio - s.vcpus_used >= v
            and s.memory_mb * s.ram_allocation_ratio - s.memory_mb_used >= m
            and s.local_gb * s.disk_allocation_ratio - s.local_gb_used >= d
            and s.host not in ignored
        ):
            bisect.insort(
                found, (s.memory_mb_used - s.memory_mb * s.ram_allocation_ratio, s.host, i)
            )
            del found[best:]
    return [(i, view[i]) for _, _, i in found]
