"""Read fake hypervisors' state files from outside the agents (test invariants, tools).

The files are replaced atomically, so reading them while the agents run is safe. The phases are
the raw persisted ones: an agent restart would still turn ``spawning`` into ``error`` and
``migrating_out`` into ``running`` (see docs/virt.md §5).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from compute_agent.virt._guest import GuestRecord
from compute_agent.virt.exceptions import StateFileError
from compute_agent.virt.models import InstanceInfo
from compute_agent.virt.state_store import FORMAT_VERSION


def _read_all(state_dir: Path) -> dict[str, str]:
    if not state_dir.is_dir():
        return {}
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(state_dir.glob("*.json"))}


def _parse(path: str, text: str) -> dict[str, InstanceInfo]:
    try:
        document = json.loads(text)
        if document.get("format") != FORMAT_VERSION:
            raise ValueError("unknown format")
        guests = [GuestRecord.from_json(g) for g in dict(document.get("guests") or {}).values()]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise StateFileError(path=path, reason=repr(exc)) from exc
    return {g.uuid: g.info() for g in guests}


async def hypervisor_view(state_dir: Path) -> dict[str, dict[str, InstanceInfo]]:
    """``{host: {uuid: InstanceInfo}}`` for every ``<host>.json`` in ``state_dir``."""
    texts = await asyncio.to_thread(_read_all, state_dir)
    return {host: _parse(str(state_dir / f"{host}.json"), text) for host, text in texts.items()}


def guest_homes(view: dict[str, dict[str, InstanceInfo]]) -> dict[str, list[str]]:
    """``{uuid: [hosts where the guest is in an owner phase]}``; exactly one host is healthy."""
    homes: dict[str, list[str]] = {}
    for host, guests in view.items():
        for uuid, info in guests.items():
            homes.setdefault(uuid, [])
            if info.owns_guest:
                homes[uuid].append(host)
    return homes
