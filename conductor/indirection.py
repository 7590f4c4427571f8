"""The conductor's object indirection endpoints: agents' remotable calls land here.

Three methods (as in Nova since Liberty) — ``object_class_action_versions``, ``object_action``
and ``object_backport_versions`` — plus ``ping`` in namespace ``baseapi``.

Security: names arriving from the wire are never used with ``getattr``. Only methods that a
registered Fleet class marks remotable are callable, found in an allow-list built by scanning the
class (``inspect.getattr_static``, no descriptors run); private names are never listed. Arguments
are bound to the method's signature and checked against its annotations before anything runs.
Every refusal is an ``IndirectionError`` from ``shared_objects.exception``, which agents re-raise
as the same class.

Authorisation (``conductor/object_policy.py``, table in ``shared_objects/policy.py``): every call
is admitted for the broker-validated caller before it runs; an agent's call runs under its
ownership scope, enforced inside the statements. Refusals are ``Forbidden`` error replies with one
audit line; every accepted change is audited too.

Each call runs in one database unit of work (``Database.request``: ``context.db`` set, committed
at the end), and object results are backported to the caller's version manifest. A database
outage during the call (or its commit) reaches the caller as ``DatabaseUnavailable``
(``conductor/db/errors.py``).
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from oslo_utils import versionutils
from oslo_versionedobjects import exception as ovo_exception

from conductor.db.errors import database_unavailable_boundary
from conductor.db.session import Database
from conductor.object_policy import Admission, ObjectPolicy, accepted, refused_inside
from shared_objects import exception
from shared_objects.base import (
    FleetObject,
    FleetObjectRegistry,
    is_remotable,
    obj_tree_get_versions,
)
from shared_objects.context import RequestContext
from shared_objects.rpc_clients import conductor as conductor_api
from shared_objects.runtime.identity import Identities
from shared_objects.runtime.messaging import ExpectedException, Target, expose

log = structlog.get_logger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class RemotableMethod:
    """One callable entry of the allow-list."""

    name: str
    is_classmethod: bool
    # The remotable wrapper: called as fn(cls_or_obj, *args, **kwargs).
    fn: Callable[..., Any]
    signature: inspect.Signature
    hints: Mapping[str, Any]


_ALLOW_LISTS: dict[type[FleetObject], Mapping[str, RemotableMethod]] = {}


def remotable_methods(cls: type[FleetObject]) -> Mapping[str, RemotableMethod]:
    """The allow-list of ``cls``: its public methods marked remotable (cached per class)."""
    cached = _ALLOW_LISTS.get(cls)
    if cached is not None:
        return cached
    out: dict[str, RemotableMethod] = {}
    for name in dir(cls):
        if name.startswith("_"):
            continue
        static = inspect.getattr_static(cls, name)
        if isinstance(static, classmethod):
            func, is_cm = static.__func__, True
        elif inspect.isfunction(static):
            func, is_cm = static, False
        else:
            continue
        if not is_remotable(func):
            continue
        original = func.original_fn  # type: ignore[attr-defined]
        try:
            hints = typing.get_type_hints(original)
        except (NameError, TypeError):
            hints = {}
        out[name] = RemotableMethod(name, is_cm, func, inspect.signature(original), hints)
    allowed = _ALLOW_LISTS[cls] = types.MappingProxyType(out)
    return allowed


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a wire value fits an annotation (the JSON-able subset our remotables use)."""
    if hint is Any or hint is object:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in typing.get_args(hint))
    if hint is type(None) or hint is None:
        return value is None
    if origin in (list, tuple, collections.abc.Sequence, set, frozenset):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        return all(_conforms(v, inner) for v in value)
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            return False
        kv = typing.get_args(hint) or (Any, Any)
        return all(_conforms(k, kv[0]) and _conforms(v, kv[1]) for k, v in value.items())
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    # An annotation we do not model: let the method's own checks decide.
    return True


@functools.lru_cache(maxsize=256)
def _vtuple(version: str) -> tuple[int, ...]:
    """A version string as a tuple (cached: the same few versions arrive on every call)."""
    return tuple(versionutils.convert_version_to_tuple(version))


def _manifest_is_current(objname: str, manifest: Mapping[str, str]) -> bool:
    """Whether ``manifest`` names our newest version of every object in ``objname``'s tree."""
    return all(manifest.get(name) == version for name, version in _tree(objname).items())


def _tree(objname: str) -> dict[str, str]:
    try:
        return obj_tree_get_versions(objname)
    except ovo_exception.UnregisteredSubobject:
        return {objname: ""}


def _stored_values(obj: FleetObject) -> dict[str, Any]:
    """The values of the fields that are set, read from oslo's storage (no properties)."""
    store = obj.__dict__
    return {name: store[f"_obj_{name}"] for name in obj.fields if f"_obj_{name}" in store}


def _call_target(args: list[Any], kwargs: Mapping[str, Any]) -> Any:
    """What a class-level call is about, for the audit line: its first argument."""
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


def _object_target(obj: FleetObject) -> Any:
    """An object's identity for the audit line (uuid, else id, else its name)."""
    store = obj.__dict__
    for name in ("uuid", "id", "host"):
        value = store.get(f"_obj_{name}")
        if value is not None:
            return f"{obj.obj_name()}:{value}"
    return obj.obj_name()


def _refuse(exc: exception.IndirectionError, ctxt: RequestContext) -> ExpectedException:
    log.warning("indirection_refused", error=str(exc), caller=ctxt.caller)
    return ExpectedException(exc)


class ConductorIndirectionEndpoint:
    """RPC endpoint (topic ``conductor``, namespace None) for object calls; its version history
    is in ``shared_objects.rpc_clients.conductor``."""

    target = Target(version=conductor_api.API_VERSION)

    def __init__(self, database: Database, identities: Identities | None = None) -> None:
        self._database = database
        self.policy = ObjectPolicy(identities if identities is not None else Identities())

    # ---- validation -------------------------------------------------------------------------

    @staticmethod
    def _manifest(objname: str, object_versions: Any) -> dict[str, str]:
        if not isinstance(object_versions, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in object_versions.items()
        ):
            raise exception.InvalidObjectCall(
                objname=objname, method="-", reason="object_versions must map names to versions"
            )
        return object_versions

    @staticmethod
    def class_for(objname: Any, version: Any) -> type[FleetObject]:
        """The registered class serving ``objname`` at ``version`` (same major, newest minor)."""
        if not isinstance(objname, str):
            raise exception.UnknownObject(objname=repr(objname))
        classes = FleetObjectRegistry.classes_of(objname)
        if not classes:
            raise exception.UnknownObject(objname=objname)
        try:
            wanted = _vtuple(version)
        except (ValueError, TypeError, AttributeError):
            raise exception.InvalidObjectCall(
                objname=objname, method="-", reason=f"bad version {version!r}"
            ) from None
        for cls in classes:  # newest first
            have = _vtuple(cls.VERSION)
            if have[0] == wanted[0] and have >= wanted:
                return cls
        raise exception.UnsupportedObjectVersion(
            objname=objname, version=version, supported=classes[0].VERSION
        )

    @staticmethod
    def lookup(cls: type[FleetObject], objmethod: Any, *, classmethod_: bool) -> RemotableMethod:
        """The allow-listed method, or ``ObjectMethodNotAllowed``."""
        name = objmethod if isinstance(objmethod, str) else repr(objmethod)
        entry = remotable_methods(cls).get(name) if isinstance(objmethod, str) else None
        if entry is None or entry.is_classmethod != classmethod_:
            raise exception.ObjectMethodNotAllowed(objname=cls.obj_name(), method=name)
        return entry

    @staticmethod
    def bind(
        method: RemotableMethod, objname: str, first: Any, ctxt: Any, args: Any, kwargs: Any
    ) -> tuple[list[Any], dict[str, Any]]:
        """Check ``args``/``kwargs`` against the method's signature and annotations."""

        def bad(reason: str) -> exception.InvalidObjectCall:
            return exception.InvalidObjectCall(objname=objname, method=method.name, reason=reason)

        if args is None:
            args = []
        if kwargs is None:
            kwargs = {}
        if not isinstance(args, (list, tuple)):
            raise bad(f"args must be a list, not {type(args).__name__}")
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise bad("kwargs must be a mapping of names")
        lead = (first, ctxt) if method.is_classmethod else (first,)
        try:
            bound = method.signature.bind(*lead, *args, **kwargs)
        except TypeError as exc:
            raise bad(str(exc)) from None
        skip = set(list(method.signature.parameters)[: len(lead)])
        for pname, value in bound.arguments.items():
            if pname in skip:
                continue
            hint = method.hints.get(pname, Any)
            if not _conforms(value, hint):
                raise bad(f"argument {pname}={value!r} is not {hint}")
        return list(args), dict(kwargs)

    @staticmethod
    def backport(value: Any, manifest: Mapping[str, str]) -> Any:
        """Objects in ``value`` as primitives at the caller's manifest versions when older."""
        if isinstance(value, FleetObject):
            target = manifest.get(value.obj_name())
            if target is None:
                return value
            have = _vtuple(value.VERSION)
            want = _vtuple(target)
            if want > have and want[0] == have[0]:
                # A caller newer than the conductor (conductors upgrade first, so rare): it can
                # read our older version as is. Never "convert" upwards (Nova bug #1596119).
                return value
            if want == have and _manifest_is_current(value.obj_name(), manifest):
                # The caller knows every version in this object's tree: nothing to convert (the
                # common case; skips oslo's walk of the tree).
                return value
            # Even at the same top-level version, sub-objects may need backporting.
            return value.obj_to_primitive(target_version=target, version_manifest=dict(manifest))
        if isinstance(value, (list, tuple)):
            return [ConductorIndirectionEndpoint.backport(v, manifest) for v in value]
        if isinstance(value, dict):
            return {k: ConductorIndirectionEndpoint.backport(v, manifest) for k, v in value.items()}
        return value

    # ---- the RPC methods ----------------------------------------------------------------------

    @expose
    async def object_class_action_versions(
        self,
        ctxt: RequestContext,
        objname: Any = None,
        objmethod: Any = None,
        object_versions: Any = None,
        args: Any = None,
        kwargs: Any = None,
    ) -> Any:
        """Run remotable classmethod ``objname.objmethod``; answer at the caller's versions."""
        try:
            manifest = self._manifest(str(objname), object_versions)
            if not isinstance(objname, str) or objname not in manifest:
                raise exception.InvalidObjectCall(
                    objname=str(objname), method=str(objmethod), reason="object not in manifest"
                )
            cls = self.class_for(objname, manifest[objname])
            method = self.lookup(cls, objmethod, classmethod_=True)
            call_args, call_kwargs = self.bind(method, objname, cls, ctxt, args, kwargs)
            admission = self.policy.admit(
                ctxt, objname, method.name, method.signature, (cls, ctxt), call_args, call_kwargs
            )
        except exception.IndirectionError as exc:
            raise _refuse(exc, ctxt) from exc
        except exception.Forbidden as exc:
            raise ExpectedException(exc) from exc
        target = _call_target(call_args, call_kwargs)
        result = await self._run(
            admission, target, ctxt, method.fn, cls, ctxt, *call_args, **call_kwargs
        )
        return self.backport(result, manifest)

    async def _run(
        self,
        admission: Admission,
        target: Any,
        ctxt: RequestContext,
        fn: Callable[..., Any],
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """Run one admitted remotable in its own unit of work, under the admission's scope."""
        try:
            async with (
                database_unavailable_boundary(admission.action, ctxt.caller),
                self._database.request(ctxt, single_call=True, scope=admission.scope),
            ):
                result = await fn(*args, **kwargs)
        except exception.Forbidden as exc:
            refused_inside(admission, target, exc)
            raise ExpectedException(exc) from exc
        except exception.FleetException as exc:
            # Includes DatabaseUnavailable: logged once, at WARNING, by the boundary.
            raise ExpectedException(exc) from exc
        accepted(admission, target)
        return result

    @expose
    async def object_action(
        self,
        ctxt: RequestContext,
        objinst: Any = None,
        objmethod: Any = None,
        args: Any = None,
        kwargs: Any = None,
    ) -> tuple[dict[str, Any], Any]:
        """Run remotable method ``objmethod`` on ``objinst``; answer ``(updates, result)``
        where updates are the fields the method changed, as primitives."""
        try:
            if not isinstance(objinst, FleetObject):
                raise exception.InvalidObjectCall(
                    objname=type(objinst).__name__,
                    method=str(objmethod),
                    reason="objinst must be a Fleet object",
                )
            objname = objinst.obj_name()
            method = self.lookup(type(objinst), objmethod, classmethod_=False)
            call_args, call_kwargs = self.bind(method, objname, objinst, ctxt, args, kwargs)
            admission = self.policy.admit(
                ctxt, objname, method.name, method.signature, (objinst,), call_args, call_kwargs
            )
        except exception.IndirectionError as exc:
            raise _refuse(exc, ctxt) from exc
        except exception.Forbidden as exc:
            raise ExpectedException(exc) from exc
        objinst._context = ctxt
        # What each field held before the call (containers copied, so an in-place change shows;
        # object-valued fields are always sent back, as Nova's clone-and-compare did, since they
        # may have changed inside).
        before = {
            name: copy.copy(value) if isinstance(value, (dict, list, set)) else value
            for name, value in _stored_values(objinst).items()
        }
        result = await self._run(
            admission, _object_target(objinst), ctxt, method.fn, objinst, *call_args, **call_kwargs
        )
        updates: dict[str, Any] = {}
        missing = object()
        for name, value in _stored_values(objinst).items():
            old = before.get(name, missing)
            if old is missing or isinstance(value, FleetObject) or old != value:
                field = objinst.fields[name]
                updates[name] = field.to_primitive(objinst, name, value)
        # Safe: a field with this name would clash with the method anyway (Nova's convention).
        updates["obj_what_changed"] = sorted(objinst.obj_what_changed())
        return updates, result

    @expose
    async def object_backport_versions(
        self, ctxt: RequestContext, objinst: Any = None, object_versions: Any = None
    ) -> Any:
        """``objinst`` (which the caller could not read) as a primitive at its manifest."""
        try:
            if not isinstance(objinst, FleetObject):
                raise exception.InvalidObjectCall(
                    objname=type(objinst).__name__,
                    method="object_backport_versions",
                    reason="objinst must be a Fleet object",
                )
            objname = objinst.obj_name()
            manifest = self._manifest(objname, object_versions)
            if objname not in manifest:
                raise exception.InvalidObjectCall(
                    objname=objname, method="object_backport_versions", reason="not in manifest"
                )
            try:
                return objinst.obj_to_primitive(
                    target_version=manifest[objname], version_manifest=manifest
                )
            except (ovo_exception.VersionedObjectsException, ValueError) as exc:
                raise exception.InvalidObjectCall(
                    objname=objname, method="object_backport_versions", reason=str(exc)
                ) from exc
        except exception.IndirectionError as exc:
            raise _refuse(exc, ctxt) from exc


class BaseAPIEndpoint:
    """``ping`` in namespace ``baseapi``: a liveness probe that echoes its argument."""

    target = Target(
        namespace=conductor_api.BASEAPI_NAMESPACE, version=conductor_api.BASEAPI_VERSION
    )

    @expose
    async def ping(self, ctxt: RequestContext, arg: Any = None) -> Any:
        return arg
