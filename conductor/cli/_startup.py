"""Start-up cost of the ``fleetctl`` process (``bench/cli.py`` measures it).

oslo.versionedobjects imports oslo.messaging for one thing, the base class of its serializer
(``NoOpSerializer``). Fleet has its own RPC runtime and never uses oslo.messaging, whose import
(eventlet, oslo.service, ...) costs about 0.3 s of CPU, more than the rest of a ``fleetctl list``.
The ``fleetctl`` process therefore registers a module holding only that class under the name
``oslo_messaging`` before the objects load. Only the command-line entry point does this, and
only when nothing imported oslo.messaging first: services, tests and tools get the real one.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class NoOpSerializer:
    """oslo.messaging's ``NoOpSerializer``: passes everything through (Fleet uses its own
    ``FleetObjectSerializer``; this is only a base class of an oslo class Fleet never uses)."""

    def serialize_entity(self, ctxt: Any, entity: Any) -> Any:
        return entity

    def deserialize_entity(self, ctxt: Any, entity: Any) -> Any:
        return entity

    def serialize_context(self, ctxt: Any) -> Any:
        return ctxt

    def deserialize_context(self, ctxt: Any) -> Any:
        return ctxt


def skip_oslo_messaging() -> None:
    """Stand in for ``oslo_messaging`` with its ``NoOpSerializer`` (see the module docstring)."""
    if "oslo_messaging" in sys.modules or "oslo_versionedobjects.base" in sys.modules:
        return
    module = types.ModuleType("oslo_messaging", "fleetctl's stand-in: NoOpSerializer only")
    module.NoOpSerializer = NoOpSerializer  # type: ignore[attr-defined]
    sys.modules["oslo_messaging"] = module
