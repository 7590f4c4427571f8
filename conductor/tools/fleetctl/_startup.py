"""Start-up cost of the ``fleetctl`` process (``bench/cli.py`` measures it).

oslo.versionedobjects imports oslo.messaging for one thing, the base class of its serializer
(``NoOpSerializer``). Fleet has its own RPC runtime and never uses oslo.messaging, whose import
(eventlet, oslo.service, ...) costs about 0.3 s of CPU, more than the rest of a ``fleetctl list``.
The ``fleetctl`` process therefore registers a module holding only that class under the name
``oslo_messaging`` before the objects load. Only the command-line entry point does this, and
only when nothing imported oslo.messaging first: services, tests and tools get the real one.

Three more modules that oslo.config and oslo.versionedobjects import at start but use only
inside functions a ``fleetctl`` command rarely calls are deferred (``defer_imports``): rfc3986
(the ``URI`` option type; compiles its grammar at import), stevedore (configuration-source
drivers; reads the installed packages' entry points) and oslo.utils' ``strutils``
(``mask_password`` and ``bool_from_string``; compiles hundreds of patterns at import). Each is
replaced by a stand-in module that imports the real one on first use of any attribute and
forwards to it, so behaviour is unchanged; together they are about 60 ms of the start-up CPU.
oslo.utils' ``timeutils`` adds one more of the kind: ``zoneinfo`` (with ``sysconfig``), used
only when a time zone is named (``iso8601`` is not deferred: every listing of objects with
timestamps parses some). Only modules that exist
and are imported whole may be deferred: a stand-in for an optional module would make
``try: import x / except ImportError`` believe it is there, and one for a submodule is not set
as its package's attribute.

argparse translates each of its strings through ``gettext.gettext``, which searches the locale
directories for a ``messages`` catalogue on every call (four ``stat`` calls each, over a hundred
calls to build ``fleetctl``'s parser, none cached when nothing is found):
``cache_argparse_messages`` looks the catalogue up once and gives argparse that translation's
``gettext``: the same lookup with the same answer (the locale does not change while the command
runs), about 4 ms less.

The cyclic garbage collector is paused while the process starts (``pause_gc``): importing the
runtime allocates tens of thousands of objects, which set off collections that find nothing to
free (the modules, classes and functions stay alive) and cost 15-30 ms. The session resumes it
once connected (``resume_gc``), so a long ``--wait`` runs with the collector as usual, after
moving everything start-up built to the collector's permanent generation (``gc.freeze``): it
lives as long as the process, and neither later collections nor the one at exit walk it again.
"""

from __future__ import annotations

import gc
import importlib
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


def cache_argparse_messages() -> None:
    """Give argparse the ``messages`` translation found once (see the module docstring)."""
    import argparse
    import gettext

    argparse._ = gettext.translation("messages", fallback=True).gettext  # type: ignore[attr-defined]


#: Imported by oslo.config / oslo.versionedobjects at start, used only inside functions.
DEFERRED = ("rfc3986", "stevedore", "oslo_utils.strutils", "zoneinfo")


def defer_imports(names: tuple[str, ...] = DEFERRED) -> None:
    """Register a stand-in for each module of ``names`` not imported yet: the first attribute
    read imports the real module (which then replaces the stand-in in ``sys.modules``) and every
    read is forwarded to it (see the module docstring)."""
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = _stand_in(name)


def _stand_in(name: str) -> types.ModuleType:
    stand_in = types.ModuleType(name, f"fleetctl's stand-in: {name}, imported on first use")

    def __getattr__(attr: str) -> Any:
        real = sys.modules.get(name)
        if real is stand_in or real is None:
            sys.modules.pop(name, None)
            try:
                real = importlib.import_module(name)
            except BaseException:
                sys.modules[name] = stand_in
                raise
        return getattr(real, attr)

    stand_in.__getattr__ = __getattr__  # type: ignore[method-assign]
    return stand_in


_gc_paused = False


def pause_gc() -> None:
    """Pause the cyclic garbage collector for the start-up (see the module docstring)."""
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def resume_gc() -> None:
    """Resume the collector if ``pause_gc`` paused it (idempotent; a no-op otherwise)."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.freeze()
        gc.enable()
