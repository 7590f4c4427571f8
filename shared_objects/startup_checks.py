"""Refusing to start in a fleet this release cannot work in, with a message saying why.

Upgrade order is conductors first, then agents. An agent newer than every conductor would send
objects no conductor can read; a conductor facing agents older than the oldest release it still
supports would send them objects they cannot read. Both refuse to start instead.
"""

from __future__ import annotations

import datetime
from typing import Any

from shared_objects import exception, releases
from shared_objects.objects.service import ServiceList


async def check_conductors_not_older(ctxt: Any, binary: str, service_down_time: float) -> None:
    """Raise ``ServiceTooNew`` when every live conductor is older than this release."""
    now = datetime.datetime.now(datetime.UTC)
    conductors = [
        s
        for s in await ServiceList.get_by_binary(ctxt, releases.BINARY_CONDUCTOR)
        if s.is_up_at(now, service_down_time)
    ]
    if not conductors:
        return
    newest = max(s.version for s in conductors)
    if newest < releases.SERVICE_VERSION:
        raise exception.ServiceTooNew(
            binary=binary,
            release=releases.CURRENT.name,
            version=releases.SERVICE_VERSION,
            conductor_version=newest,
        )


async def check_computes_supported(ctxt: Any, service_down_time: float) -> None:
    """Raise ``ServiceTooOld`` when a live compute service predates every supported release."""
    now = datetime.datetime.now(datetime.UTC)
    oldest = releases.RELEASES[0]
    too_old = [
        s
        for s in await ServiceList.get_by_binary(ctxt, releases.BINARY_COMPUTE)
        if s.is_up_at(now, service_down_time) and s.version < oldest.service_version
    ]
    if too_old:
        raise exception.ServiceTooOld(
            hosts=", ".join(sorted(s.host for s in too_old)),
            version=min(s.version for s in too_old),
            oldest=oldest.name,
            oldest_version=oldest.service_version,
        )
