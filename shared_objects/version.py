"""The one version string of Fleet: the package metadata (``pyproject.toml`` reads it from here),
``conductor --version``, ``compute-agent --version``, ``fleetctl --version`` and the ``version``
label of ``fleet_service_info`` on ``/metrics`` all show it.

Its ``major.minor`` is the release (``shared_objects.releases.CURRENT.name``); the integer
*service version* that services write in the ``services`` table (and ``fleetctl services``
shows) is that release's ``service_version``: ``describe()`` prints both.
"""

from __future__ import annotations

__all__ = ["VERSION", "describe"]

VERSION = "1.2.0.dev0"


def describe(prog: str) -> str:
    """``--version`` text: the version, and the service version stored for this release."""
    from shared_objects import releases

    return (
        f"{prog} {VERSION} (release {releases.CURRENT.name}, "
        f"service version {releases.SERVICE_VERSION})"
    )
