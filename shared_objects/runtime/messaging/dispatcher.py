"""Endpoint method lookup: namespace, version compatibility, and explicit exposure.

Method names arrive from the network, so they are never passed to ``getattr``: each endpoint's
callable methods are collected once, at server construction, from those marked ``@expose`` whose
names do not start with ``_``; a lookup is a dictionary access on that table.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from shared_objects.runtime.messaging.exceptions import NoSuchMethod, UnsupportedVersion
from shared_objects.runtime.messaging.target import Target
from shared_objects.runtime.messaging.versions import parse_version, version_is_compatible

F = TypeVar("F", bound=Callable[..., Any])

_EXPOSED_ATTR = "_fleet_rpc_exposed"
DEFAULT_VERSION = "1.0"


def expose(func: F) -> F:
    """Mark an endpoint method as callable over RPC (only exposed public methods are)."""
    setattr(func, _EXPOSED_ATTR, True)
    return func


def is_exposed(func: Any) -> bool:
    return bool(getattr(func, _EXPOSED_ATTR, False))


class _Endpoint:
    __slots__ = ("methods", "namespace", "obj", "version")

    def __init__(self, obj: Any):
        target = getattr(obj, "target", None)
        if target is not None and not isinstance(target, Target):
            raise TypeError(f"endpoint {obj!r}: 'target' must be a Target")
        self.obj = obj
        self.namespace = target.namespace if target is not None else None
        self.version = (target.version if target is not None else None) or DEFAULT_VERSION
        parse_version(self.version)  # fail at construction, not at the first call
        self.methods: dict[str, Callable[..., Any]] = {}
        for name, attr in inspect.getmembers_static(type(obj)):
            if name.startswith("_"):
                continue
            func = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
            if callable(func) and is_exposed(func):
                self.methods[name] = getattr(obj, name)


class Dispatcher:
    """Finds the handler for (method, namespace, version) among a server's endpoints."""

    def __init__(self, endpoints: Iterable[Any]):
        self.endpoints = [_Endpoint(e) for e in endpoints]
        if not self.endpoints:
            raise ValueError("an RPC server needs at least one endpoint")

    def lookup(self, method: str, namespace: str | None, version: str | None) -> Callable[..., Any]:
        """The bound handler; ``NoSuchMethod`` if a compatible endpoint lacks it, else
        ``UnsupportedVersion`` (oslo's rule)."""
        requested = version or DEFAULT_VERSION
        try:
            parse_version(requested)
        except ValueError:
            raise UnsupportedVersion(str(requested), method) from None
        compatible = False
        for endpoint in self.endpoints:
            if endpoint.namespace != namespace:
                continue
            if not version_is_compatible(endpoint.version, requested):
                continue
            compatible = True
            handler = endpoint.methods.get(method)
            if handler is not None:
                return handler
        if compatible:
            raise NoSuchMethod(method)
        raise UnsupportedVersion(requested, method)

    def exposed_methods(self) -> set[str]:
        return {name for e in self.endpoints for name in e.methods}

    def exposed_pairs(self) -> set[tuple[str | None, str]]:
        """Every (namespace, method) a request can reach: what an authorizer must cover."""
        return {(e.namespace, name) for e in self.endpoints for name in e.methods}
