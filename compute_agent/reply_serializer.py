"""Objects in an agent's replies, at the versions of the caller's release.

A caller's request names the compute API version it chose (capped at the oldest live agent's
release); an agent of a newer release answers with the objects of the release that speaks that
version, so an older peer (a destination asking this source about a live migration) never
receives objects it does not know and never needs the conductor's backport safety net.
"""

from __future__ import annotations

from typing import Any

from shared_objects import releases
from shared_objects.runtime.messaging import request_version
from shared_objects.serializer import FleetObjectSerializer


class CallerReleaseSerializer(FleetObjectSerializer):
    """``FleetObjectSerializer`` that serialises objects at the requesting release's versions.

    Deserialising (arguments) is the base class's; serialising (results) goes through one
    serializer per release, so concurrent handlers never share a mutable manifest.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._per_release: dict[str, FleetObjectSerializer] = {}

    async def serialize_entity(self, ctxt: Any, entity: Any) -> Any:
        version = request_version()
        if version is None:
            return await super().serialize_entity(ctxt, entity)
        release = releases.for_compute_rpc_api(version)
        if release is releases.CURRENT:
            return await super().serialize_entity(ctxt, entity)
        serializer = self._per_release.get(release.name)
        if serializer is None:
            serializer = FleetObjectSerializer(version_manifest=release.objects)
            self._per_release[release.name] = serializer
        return await serializer.serialize_entity(ctxt, entity)
