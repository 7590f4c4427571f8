"""Objects ↔ primitives in RPC arguments and results (the async Serializer of docs/rpc.md).

Objects become oslo.versionedobjects primitives (at the versions of ``version_manifest`` when
one is given, e.g. the receiver's release); primitives that carry ``versioned_object.name``
become objects again. A primitive at a version this process does not know is sent to the
conductor for a backport (``object_backport_versions``) when an indirection API is available;
``backport_count`` counts those. Containers (list, tuple, set, dict) are walked recursively.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from oslo_utils import versionutils
from oslo_versionedobjects import exception as ovo_exception

from shared_objects import exception
from shared_objects.base import (
    FleetObject,
    FleetObjectRegistry,
    IndirectionAPI,
    obj_tree_get_versions,
)

_NS = FleetObject.OBJ_SERIAL_NAMESPACE
NAME_KEY = f"{_NS}.name"
VERSION_KEY = f"{_NS}.version"
DATA_KEY = f"{_NS}.data"
NAMESPACE_KEY = f"{_NS}.namespace"
CHANGES_KEY = f"{_NS}.changes"

log = structlog.get_logger(__name__)

# [logging] trace_object_versions logs the name and version of every object this process
# receives: how upgrade tests prove, from an old agent's own logs, that it was only sent what it
# knows. Part of the process's log configuration, so set once at start with the rest of it
# (``shared_objects.runtime.log.configure_service_logging``), for every serializer of the process.
_trace_versions = False


def trace_object_versions(enabled: bool) -> None:
    """Log ``object_received`` (name, version) for every object this process receives, or not."""
    global _trace_versions
    _trace_versions = enabled


# Set while a backport request is in flight: a reply that is still too new must fail, not loop.
_BACKPORTING: contextvars.ContextVar[bool] = contextvars.ContextVar("backporting", default=False)


def _check_primitive(primitive: Mapping[str, Any]) -> None:
    """Reject malformed object primitives with a clear error before oslo touches them."""
    name = primitive.get(NAME_KEY)
    version = primitive.get(VERSION_KEY)
    if not isinstance(name, str) or not name:
        raise exception.InvalidObjectPrimitive(reason=f"{NAME_KEY} must be a non-empty string")
    if not isinstance(version, str) or not all(p.isdigit() for p in version.split(".")):
        raise exception.InvalidObjectPrimitive(reason=f"{name}: bad {VERSION_KEY} {version!r}")
    if primitive.get(NAMESPACE_KEY) != FleetObject.OBJ_PROJECT_NAMESPACE:
        raise exception.InvalidObjectPrimitive(
            reason=f"{name}: namespace {primitive.get(NAMESPACE_KEY)!r} is not 'fleet'"
        )
    if not isinstance(primitive.get(DATA_KEY), dict):
        raise exception.InvalidObjectPrimitive(reason=f"{name}: {DATA_KEY} must be a mapping")
    changes = primitive.get(CHANGES_KEY, [])
    if not isinstance(changes, list) or not all(isinstance(c, str) for c in changes):
        raise exception.InvalidObjectPrimitive(reason=f"{name}: {CHANGES_KEY} must be strings")


def object_from_primitive(primitive: Mapping[str, Any], context: Any) -> FleetObject:
    """Hydrate a Fleet object, turning every way a primitive can be wrong into a clear error.

    ``IncompatibleObjectVersion`` passes through (the caller may ask for a backport).
    """
    _check_primitive(primitive)
    name = primitive[NAME_KEY]
    if not FleetObjectRegistry.classes_of(name):
        raise exception.UnknownObject(objname=name)
    try:
        obj = FleetObject.obj_from_primitive(dict(primitive), context=context)
    except ovo_exception.IncompatibleObjectVersion:
        raise
    except exception.FleetException:
        raise
    except (
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        ovo_exception.VersionedObjectsException,
    ) as exc:
        raise exception.InvalidObjectPrimitive(reason=f"{name}: {exc}") from exc
    if not isinstance(obj, FleetObject):
        raise exception.UnknownObject(objname=name)
    return obj


class FleetObjectSerializer:
    """The Serializer to give ``RPCClient``/``RPCServer`` wherever objects travel."""

    def __init__(
        self,
        indirection_api: IndirectionAPI | None = None,
        version_manifest: Mapping[str, str] | None = None,
        on_backport: Callable[[str], None] | None = None,
    ) -> None:
        # Only an explicitly given API is used: a conductor's serializer must never bounce a
        # too-new object to "the conductor", even in a test process where agent-side objects
        # have an indirection API installed.
        self._indirection_api = indirection_api
        self.version_manifest = dict(version_manifest) if version_manifest else None
        self.backport_count = 0
        # Called with the object name on every backport (e.g. a metrics counter).
        self.on_backport = on_backport

    @property
    def indirection_api(self) -> IndirectionAPI | None:
        return self._indirection_api

    @indirection_api.setter
    def indirection_api(self, api: IndirectionAPI | None) -> None:
        self._indirection_api = api

    async def serialize_entity(self, ctxt: Any, entity: Any) -> Any:
        if isinstance(entity, FleetObject):
            manifest = self.version_manifest
            if manifest and entity.obj_name() in manifest:
                target = manifest[entity.obj_name()]
                if _older(entity.VERSION, target):
                    # An object that reached us at an older version (from a sender that did not
                    # know our release yet) goes on as it is: never "convert" upwards; a reader
                    # of the newer release reads the older minor.
                    target = entity.VERSION
                return entity.obj_to_primitive(target_version=target, version_manifest=manifest)
            return entity.obj_to_primitive()
        if isinstance(entity, dict):
            return {k: await self.serialize_entity(ctxt, v) for k, v in entity.items()}
        if isinstance(entity, (list, tuple, set, frozenset)):
            items = [await self.serialize_entity(ctxt, v) for v in entity]
            return tuple(items) if isinstance(entity, tuple) else items
        return entity

    async def deserialize_entity(self, ctxt: Any, primitive: Any) -> Any:
        if isinstance(primitive, dict):
            if NAME_KEY in primitive:
                return await self._object(ctxt, primitive)
            return {k: await self.deserialize_entity(ctxt, v) for k, v in primitive.items()}
        if isinstance(primitive, (list, tuple)):
            items = [await self.deserialize_entity(ctxt, v) for v in primitive]
            return tuple(items) if isinstance(primitive, tuple) else items
        return primitive

    async def _object(self, ctxt: Any, primitive: dict[str, Any]) -> FleetObject:
        try:
            obj = object_from_primitive(primitive, ctxt)
            if _trace_versions:
                log.info(
                    "object_received", object=primitive[NAME_KEY], version=primitive[VERSION_KEY]
                )
            return obj
        except ovo_exception.IncompatibleObjectVersion as exc:
            version = primitive[VERSION_KEY]
            if version.count(".") == 2:
                # The .z part marks stable-branch additions that are safe to accept as x.y.
                trimmed = {**primitive, VERSION_KEY: ".".join(version.split(".")[:2])}
                return await self._object(ctxt, trimmed)
            api = self.indirection_api
            name = primitive[NAME_KEY]
            if api is None or _BACKPORTING.get():
                supported = FleetObjectRegistry.classes_of(name)[0].VERSION
                raise exception.UnsupportedObjectVersion(
                    objname=name, version=version, supported=supported
                ) from exc
            self.backport_count += 1
            # The safety net caught a sender that should have known better: worth a warning.
            log.warning("object_backported", object=name, version=version)
            if self.on_backport is not None:
                self.on_backport(name)
            token = _BACKPORTING.set(True)
            try:
                result = await api.object_backport_versions(
                    ctxt, primitive, obj_tree_get_versions(name)
                )
            finally:
                _BACKPORTING.reset(token)
            if isinstance(result, dict):
                return object_from_primitive(result, ctxt)
            if not isinstance(result, FleetObject):
                raise exception.InvalidObjectPrimitive(
                    reason=f"backport of {name} returned {type(result).__name__}"
                ) from exc
            return result


def _older(version: str, than: str) -> bool:
    """Whether ``version`` is an older minor of the same major as ``than``."""
    mine = versionutils.convert_version_to_tuple(version)
    other = versionutils.convert_version_to_tuple(than)
    return mine[0] == other[0] and mine < other
