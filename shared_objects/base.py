"""The Fleet object base: registry, base classes and the async ``remotable`` decorators.

A Fleet object is an oslo.versionedobjects object in the ``fleet`` namespace whose persistence
methods are ``async`` and *remotable*:

* in the conductor (the request context carries a database handle in ``context.db``) a remotable
  method runs its body, which reaches the database through ``context.db`` (see
  :class:`DatabaseAPI`);
* on an agent (``context.db`` is ``None`` and ``FleetObject.indirection_api`` is set) the call
  becomes an RPC to the conductor: class methods send the caller's object version manifest
  (``obj_tree_get_versions``) so the reply comes back at versions the caller knows; instance
  methods send the object and mirror the conductor's resulting changes back into it.

Objects never lazy-load: touching an attribute that was not loaded raises
:class:`~shared_objects.exception.ObjectAttributeNotLoaded`.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import functools
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar

from oslo_versionedobjects import base as ovo_base
from oslo_versionedobjects.base import (
    ObjectListBase,
    VersionedObject,
    VersionedObjectRegistry,
    obj_make_list,
    obj_tree_get_versions,
)

from shared_objects import exception
from shared_objects import fields as _fields

__all__ = [
    "NOT_GIVEN",
    "AtLeast",
    "DatabaseAPI",
    "FleetObject",
    "FleetObjectRegistry",
    "FleetPersistentObject",
    "Increment",
    "IndirectionAPI",
    "ObjectListBase",
    "get_db",
    "indirection_api_in_context",
    "is_remotable",
    "obj_make_list",
    "obj_tree_get_versions",
    "remotable",
    "remotable_classmethod",
    "use_indirection_api",
]

_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])

Row = dict[str, Any]


class _NotGiven:
    """Marks an optional argument the caller did not pass (``None`` is a meaningful value)."""

    _instance: ClassVar[_NotGiven | None] = None

    def __new__(cls) -> _NotGiven:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NOT_GIVEN"

    def __bool__(self) -> bool:
        return False


NOT_GIVEN: Any = _NotGiven()


class AtLeast(NamedTuple):
    """A ``column >= value`` condition in a :class:`DatabaseAPI` ``where`` mapping."""

    value: Any


class Increment(NamedTuple):
    """A ``column = column + by`` value in a :class:`DatabaseAPI` ``update``: atomic, unlike
    reading the value and writing it back."""

    by: int = 1


class DatabaseAPI(Protocol):
    """What ``context.db`` provides: the conductor's per-request database access.

    ``where`` maps column names to a value (``=``), ``None`` (``IS NULL``), a list/tuple/set
    (``IN``, ``None`` allowed inside) or :class:`AtLeast`; ``update`` values may be
    :class:`Increment`. Every lookup must be able to use an
    index (the implementation refuses lookups whose columns lead no index). Rows are plain dicts
    keyed by column name. Everything a request writes is committed together when it ends, except
    an ``update(..., standalone=True)`` made before any other write while serving one remotable
    call from an agent: that statement commits on its own at once (use it only for a method's
    single, final, self-contained write, such as a compare-and-swap save).
    """

    async def get(
        self, table: str, where: Mapping[str, Any], *, columns: Sequence[str] | None = None
    ) -> Row | None: ...

    async def select(
        self,
        table: str,
        where: Mapping[str, Any],
        *,
        columns: Sequence[str] | None = None,
        order_by: Sequence[str] = ("id",),
        descending: bool = False,
        limit: int | None = None,
    ) -> list[Row]: ...

    async def insert(self, table: str, values: Mapping[str, Any]) -> Row: ...

    async def update(
        self,
        table: str,
        where: Mapping[str, Any],
        values: Mapping[str, Any],
        *,
        returning: Sequence[str] | None = None,
        standalone: bool = False,
    ) -> list[Row]: ...

    async def delete(self, table: str, where: Mapping[str, Any]) -> int: ...

    async def min_value(self, table: str, column: str, where: Mapping[str, Any]) -> Any: ...


class IndirectionAPI(Protocol):
    """How an agent reaches the conductor for remotable calls (``rpc_clients.conductor``
    implements it over RPC, ``conductor.testing`` in-process)."""

    async def object_class_action_versions(
        self,
        context: Any,
        objname: str,
        objmethod: str,
        object_versions: dict[str, str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any: ...

    async def object_action(
        self,
        context: Any,
        objinst: FleetObject,
        objmethod: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[dict[str, Any], Any]: ...

    async def object_backport_versions(
        self, context: Any, objinst: Any, object_versions: dict[str, str]
    ) -> Any: ...


# The conductor client of the service whose task is running, when it set one: several agents
# in one process (the in-process test fleets) each reach the conductor under their own login.
# It wins over ``FleetObject.indirection_api``, the process-wide default.
_CURRENT_API: contextvars.ContextVar[IndirectionAPI | None] = contextvars.ContextVar(
    "fleet_indirection_api", default=None
)


def use_indirection_api(api: IndirectionAPI | None) -> contextvars.Token[IndirectionAPI | None]:
    """Make remotable calls of the current context (and the tasks it starts from now on) go
    through ``api``; returns the token to reset it."""
    return _CURRENT_API.set(api)


@contextlib.contextmanager
def indirection_api_in_context(api: IndirectionAPI | None) -> Iterator[None]:
    """``use_indirection_api`` for one block (e.g. a test acting as one of several agents)."""
    token = _CURRENT_API.set(api)
    try:
        yield
    finally:
        _CURRENT_API.reset(token)


class FleetObjectRegistry(VersionedObjectRegistry):
    """Registers Fleet objects (oslo keeps one process-wide table behind every registry)."""

    @classmethod
    def classes_of(cls, objname: str) -> list[type[FleetObject]]:
        """Registered Fleet classes named ``objname``, newest first (empty if none)."""
        return [c for c in cls.obj_classes().get(objname, ()) if issubclass(c, FleetObject)]

    @classmethod
    def fleet_classes(cls) -> dict[str, list[type[FleetObject]]]:
        """Registered Fleet classes by name, newest version first."""
        out: dict[str, list[type[FleetObject]]] = {}
        for name, classes in cls.obj_classes().items():
            mine = [c for c in classes if issubclass(c, FleetObject)]
            if mine:
                out[name] = mine
        return out


class FleetObject(VersionedObject):
    """Base of every Fleet object."""

    OBJ_PROJECT_NAMESPACE = "fleet"
    OBJ_SERIAL_NAMESPACE = "versioned_object"

    # Set on agents to a conductor client; left None in the conductor.
    indirection_api: ClassVar[IndirectionAPI | None] = None  # type: ignore[assignment,misc]

    # Fields that identify a row: sent with the changes by remotables declared
    # ``send_changes_only`` (e.g. ``save``), so the conductor knows which row to touch.
    obj_identity_fields: ClassVar[tuple[str, ...]] = ("id",)

    def obj_load_attr(self, attrname: str) -> None:
        """Refuse to lazy-load: async code must name what it needs up front."""
        raise exception.ObjectAttributeNotLoaded(objname=self.obj_name(), attr=attrname)

    # oslo's versions of the next two rebuild the field list on every call (quadratic in the
    # number of fields); they run several times per RPC, so these do the same work in O(n).

    def obj_attr_is_set(self, attrname: str) -> bool:
        if attrname in self.fields:
            return hasattr(self, _STORAGE_PREFIX + attrname)
        return super().obj_attr_is_set(attrname)

    def obj_to_primitive(
        self,
        target_version: str | None = None,
        version_manifest: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """oslo's primitive; at our own version it is built straight from the stored values
        (the common case on every RPC), otherwise oslo's backporting path runs."""
        if (target_version is not None and target_version != self.VERSION) or version_manifest:
            return super().obj_to_primitive(target_version, version_manifest)
        data: dict[str, Any] = {}
        store = self.__dict__
        for name, field in self.fields.items():
            key = _STORAGE_PREFIX + name
            if key in store:
                data[name] = field.to_primitive(self, name, store[key])
        primitive = {
            _PRIMITIVE_NAME: self.obj_name(),
            _PRIMITIVE_NAMESPACE: self.OBJ_PROJECT_NAMESPACE,
            _PRIMITIVE_VERSION: self.VERSION,
            _PRIMITIVE_DATA: data,
        }
        changes = [name for name in self.obj_what_changed() if name in data]
        if changes:
            primitive[_PRIMITIVE_CHANGES] = changes
        return primitive

    @classmethod
    def _obj_from_primitive(cls, context: Any, objver: str, primitive: dict[str, Any]) -> Any:
        """oslo's hydration, except that values already of their field's exact plain type
        (``str`` for a string field, ``int`` for an integer one, ...) are stored without
        oslo's identity conversion and re-coercion. Enums, None, datetimes and nested objects
        still go through the field, so wire input is validated exactly as before."""
        self = cls()
        self._context = context
        self.VERSION = objver
        data = primitive[_PRIMITIVE_DATA]
        store = self.__dict__
        fields_ = cls.fields
        for name, plain in _wire_plan(cls):
            if name not in data:
                continue
            value = data[name]
            if plain is not None and type(value) is plain:
                store[_STORAGE_PREFIX + name] = value
            else:
                field = fields_[name]
                setattr(self, name, field.from_primitive(self, name, value))
        changes = primitive.get(_PRIMITIVE_CHANGES, ())
        self._changed_fields = {name for name in changes if name in fields_}
        return self

    def obj_what_changed(self) -> set[str]:
        fields_ = self.fields
        changes = {name for name in self._changed_fields if name in fields_}
        for name in _object_valued_fields(type(self)):
            value = getattr(self, _STORAGE_PREFIX + name, None)
            if isinstance(value, VersionedObject) and value.obj_what_changed():
                changes.add(name)
        return changes

    def obj_for_changes(self) -> FleetObject:
        """A partial copy holding only the identity fields and the changed fields.

        Sent instead of the whole object by ``send_changes_only`` remotables, so a save of two
        fields carries two fields (plus the key), not the whole instance.
        """
        clone = self.__class__()
        clone.VERSION = self.VERSION
        clone._context = self._context
        changed = self.obj_what_changed()
        for name in (*self.obj_identity_fields, *changed):
            if self.obj_attr_is_set(name):
                # Already coerced once; skip the setter's second coercion.
                object.__setattr__(clone, _STORAGE_PREFIX + name, getattr(self, name))
        clone._changed_fields = set(changed)
        return clone

    def obj_apply_updates(self, updates: Mapping[str, Any]) -> None:
        """Mirror the conductor's resulting state (``object_action`` updates) into this object."""
        for key, value in updates.items():
            if key not in self.fields:
                continue
            field = self.fields[key]
            if isinstance(value, VersionedObject) or value is None:
                setattr(self, key, value)
            else:
                setattr(self, key, field.from_primitive(self, key, value))
        self.obj_reset_changes()
        self._changed_fields = {
            f
            for f in updates.get("obj_what_changed", ())
            if isinstance(f, str) and f in self.fields
        }


_STORAGE_PREFIX = "_obj_"  # where oslo's field properties keep values (base._get_attrname)
_PRIMITIVE_NAME = "versioned_object.name"
_PRIMITIVE_NAMESPACE = "versioned_object.namespace"
_PRIMITIVE_VERSION = "versioned_object.version"
_PRIMITIVE_DATA = "versioned_object.data"
_PRIMITIVE_CHANGES = "versioned_object.changes"
_OBJECT_VALUED: dict[type, tuple[str, ...]] = {}


def _object_valued_fields(cls: type[VersionedObject]) -> tuple[str, ...]:
    """Names of ``cls``'s fields that hold objects or lists of objects (cached per class)."""
    names = _OBJECT_VALUED.get(cls)
    if names is None:
        names = tuple(
            name
            for name, field in cls.fields.items()
            if isinstance(field, (_fields.ObjectField, _fields.ListOfObjectsField))
        )
        _OBJECT_VALUED[cls] = names
    return names


# Field types whose wire and stored forms are the same plain Python value and whose coercion
# checks nothing else. Left out on purpose: enums (allowed values) and non-negative numbers
# (sign), which must stay validated on input from the wire.
_WIRE_PLAIN: tuple[tuple[type, type], ...] = (
    (_fields.ovo_fields.Boolean, bool),
    (_fields.ovo_fields.UUID, str),
    (_fields.ovo_fields.Integer, int),
    (_fields.ovo_fields.Float, float),
)
_WIRE_PLANS: dict[type, tuple[tuple[str, type | None], ...]] = {}


def _wire_plan(cls: type[VersionedObject]) -> tuple[tuple[str, type | None], ...]:
    """Per field of ``cls``: the plain type a primitive value may be stored as, or None."""
    plan = _WIRE_PLANS.get(cls)
    if plan is None:
        entries: list[tuple[str, type | None]] = []
        for name, field in cls.fields.items():
            kind = field._type
            plain: type | None = None
            if type(kind) is _fields.ovo_fields.String:
                plain = str
            else:
                plain = next((py for k, py in _WIRE_PLAIN if isinstance(kind, k)), None)
            entries.append((name, plain))
        plan = _WIRE_PLANS[cls] = tuple(entries)
    return plan


class FleetPersistentObject(ovo_base.VersionedObjectMixin):
    """Mixin for objects stored in a table with timestamps and soft delete."""

    created_at: datetime.datetime | None
    updated_at: datetime.datetime | None
    deleted_at: datetime.datetime | None
    deleted: bool

    fields: MutableMapping[str, _fields.Field[Any]] = {
        "created_at": _fields.DateTimeField(nullable=True),
        "updated_at": _fields.DateTimeField(nullable=True),
        "deleted_at": _fields.DateTimeField(nullable=True),
        "deleted": _fields.BooleanField(default=False),
    }


def get_db(context: Any, objname: str, method: str) -> DatabaseAPI:
    """The request's database handle, or a clear error on a service without one."""
    db: DatabaseAPI | None = getattr(context, "db", None)
    if db is None:
        raise exception.NoDatabaseAccess(objname=objname, method=method)
    return db


def _has_db(context: Any) -> bool:
    return getattr(context, "db", None) is not None


def is_remotable(thing: Any) -> bool:
    """True for a function or bound method made by ``remotable``/``remotable_classmethod``."""
    return bool(getattr(thing, "remotable", False))


def remotable(fn: _F | None = None, *, send_changes_only: bool = False) -> Any:
    """Make an async method remotable; stack under ``@classmethod`` for class methods.

    Class methods: ``await Cls.method(context, *args, **kwargs)``. With database access
    (conductor) the body runs; otherwise, with an indirection API set (agent), the conductor
    runs it and the result comes back at the caller's versions (the manifest travels along).

    Instance methods: ``await obj.method(*args, **kwargs)`` with ``obj._context``. On an agent
    the object (or, with ``send_changes_only``, just its key and changed fields) travels to the
    conductor, which runs the method and answers ``(updates, result)``; the updates are
    mirrored into this object and its changes reset, as in Nova.
    """

    def decorate(func: _F) -> _F:
        name = func.__name__

        async def class_call(cls: Any, context: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
            api = _CURRENT_API.get() or cls.indirection_api
            if api is not None and not _has_db(context):
                objname = cls.obj_name()
                return await api.object_class_action_versions(
                    context, objname, name, obj_tree_get_versions(objname), args, kwargs
                )
            result = await func(cls, context, *args, **kwargs)
            if isinstance(result, VersionedObject):
                result._context = context
            return result

        async def instance_call(self: FleetObject, args: tuple[Any, ...], kwargs: Any) -> Any:
            ctxt = self._context
            if ctxt is None:
                raise exception.OrphanedObjectError(objname=self.obj_name(), method=name)
            api = _CURRENT_API.get() or self.indirection_api
            if api is not None and not _has_db(ctxt):
                sent = self.obj_for_changes() if send_changes_only else self
                updates, result = await api.object_action(ctxt, sent, name, args, kwargs)
                self.obj_apply_updates(updates)
                return result
            return await func(self, *args, **kwargs)

        @functools.wraps(func)
        async def wrapper(first: Any, /, *args: Any, **kwargs: Any) -> Any:
            if isinstance(first, type):
                if not args:
                    raise TypeError(f"{name}() needs a context as first argument")
                return await class_call(first, args[0], args[1:], kwargs)
            return await instance_call(first, args, kwargs)

        # Discoverable by the conductor's allow-list and oslo's fingerprinting.
        wrapper.remotable = True  # type: ignore[attr-defined]
        wrapper.original_fn = func  # type: ignore[attr-defined]
        wrapper.send_changes_only = send_changes_only  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    if fn is not None:
        return decorate(fn)
    return decorate


def remotable_classmethod(fn: Callable[..., Awaitable[Any]]) -> Any:
    """``classmethod(remotable(fn))``, for code written the Nova way."""
    return classmethod(remotable(fn))
