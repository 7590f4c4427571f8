"""The oslo.messaging wire codec: envelope, context keys, and remote exceptions.

Pure functions, no I/O: what goes into and comes out of an AMQP body. Facts from the wire
reference: the envelope is ``{"oslo.version": "2.0", "oslo.message": "<inner JSON string>"}``;
a bare dict is accepted on receive; the failure of a call is a JSON *string* in the reply.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import importlib
import json
import traceback
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from shared_objects.context import RequestContext
from shared_objects.runtime.messaging.exceptions import (
    MalformedMessage,
    RemoteError,
    UnsupportedEnvelopeVersion,
)
from shared_objects.runtime.messaging.limits import MessageLimits

ENVELOPE_VERSION = "2.0"
VERSION_KEY = "oslo.version"
MESSAGE_KEY = "oslo.message"
CONTEXT_PREFIX = "_context_"

# The runtime's own errors cross the wire under the module that held them until 1.2 moved
# the runtime into shared_objects.runtime: peers of 1.0 and 1.1 allow and import that name.
# They are sent under it and rebuilt from the module that holds them now.
WIRE_EXCEPTIONS_MODULE = "shared_objects.messaging.exceptions"
_WIRE_MODULES = {RemoteError.__module__: WIRE_EXCEPTIONS_MODULE}
_LOCAL_MODULES = {wire: local for local, wire in _WIRE_MODULES.items()}

# Modules whose exceptions every Fleet client may re-create: Python's own and ours.
ALWAYS_ALLOWED_EXMODS = frozenset(
    {"builtins", "exceptions", WIRE_EXCEPTIONS_MODULE, RemoteError.__module__}
)

# oslo_utils.timeutils.PERFECT_TIME_FORMAT, what oslo's jsonutils turns datetimes into.
_PERFECT_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"
_REMOTE_SUFFIX = "_Remote"


def _to_primitive(value: Any) -> Any:
    """``json`` fallback for the types oslo's ``jsonutils`` also converts."""
    if isinstance(value, datetime.datetime):
        return value.strftime(_PERFECT_TIME_FORMAT)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, (uuid.UUID, decimal.Decimal)):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_encoder = json.JSONEncoder(default=_to_primitive, separators=(", ", ": "))
_decoder = json.JSONDecoder()


def dumps(value: Any) -> str:
    """JSON text of ``value`` (datetimes, sets, UUIDs converted like oslo's jsonutils)."""
    return _encoder.encode(value)


def encode_message(inner: Mapping[str, Any]) -> bytes:
    """AMQP body for ``inner``, wrapped in the 2.0 envelope."""
    # The inner JSON becomes a JSON string value: encode it once more as a string literal.
    return (
        '{"oslo.version": "2.0", "oslo.message": ' + _encoder.encode(_encoder.encode(inner)) + "}"
    ).encode()


def _loads(text: str | bytes, limits: MessageLimits | None = None) -> Any:
    try:
        if limits is not None:
            # Before decoding: a too-deep text never reaches the recursive decoder.
            limits.check_depth(text.encode() if isinstance(text, str) else text)
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return _decoder.decode(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # The type only: the message of a decoding error quotes the input.
        raise MalformedMessage(f"body is not valid JSON: {type(exc).__name__}") from None


def decode_message(body: bytes, limits: MessageLimits | None = None) -> dict[str, Any]:
    """The inner dict of an AMQP body; ``MalformedMessage`` if it cannot be one.

    With ``limits``, the body's size and the nesting depth of the envelope and of the inner
    message are checked before each is decoded (``MessageTooLarge``, ``MessageTooDeep``).
    ``UnsupportedEnvelopeVersion`` carries, when it can be parsed, the inner dict as
    ``exc.message`` so the receiver can still address an error reply.
    """
    if limits is not None:
        limits.check_size(len(body))
    outer = _loads(body, limits)
    if not isinstance(outer, dict):
        raise MalformedMessage(f"body is a JSON {type(outer).__name__}, not an object")
    if VERSION_KEY not in outer or MESSAGE_KEY not in outer:
        return outer  # pre-envelope ("1.0") format, accepted by oslo too
    version = outer[VERSION_KEY]
    inner_text = outer[MESSAGE_KEY]
    if not isinstance(inner_text, str):
        raise MalformedMessage("envelope oslo.message is not a string")
    if version != ENVELOPE_VERSION and not _envelope_compatible(version):
        error = UnsupportedEnvelopeVersion(version)
        try:
            inner = _loads(inner_text, limits)
        except MalformedMessage:
            inner = None
        error.message = inner if isinstance(inner, dict) else None
        raise error
    inner = _loads(inner_text, limits)
    if not isinstance(inner, dict):
        raise MalformedMessage(f"envelope holds a JSON {type(inner).__name__}, not an object")
    return inner


# Bodies above this are checked and decoded in a worker thread: the depth check's passes and the
# decoder's work then share the GIL with the event loop instead of holding the loop for their
# whole duration (up to ~1 s for a hostile 8 MiB body at the default depth limit).
_OFFLOAD_BYTES = 256 * 1024


async def decode_received(body: bytes, limits: MessageLimits) -> dict[str, Any]:
    """``decode_message`` for a delivery: an oversize body is refused at once, a large one is
    checked and decoded off the event loop."""
    limits.check_size(len(body))
    if len(body) > _OFFLOAD_BYTES:
        return await asyncio.to_thread(decode_message, body, limits)
    return decode_message(body, limits)


def _envelope_compatible(version: Any) -> bool:
    # oslo: same major as 2.0 and minor <= 0, i.e. only "2.0" spelled differently ("2", "2.0.0").
    if not isinstance(version, str):
        return False
    parts = version.split(".")
    return parts[0] == "2" and all(p == "0" for p in parts[1:]) and len(parts) <= 3


def pack_context(ctxt: RequestContext | Mapping[str, Any] | None) -> dict[str, Any]:
    """``_context_<key>`` items for a request (``caller`` and ``db`` are never sent)."""
    if ctxt is None:
        return {}
    values = ctxt.to_dict() if isinstance(ctxt, RequestContext) else ctxt
    return {CONTEXT_PREFIX + key: value for key, value in values.items()}


def unpack_context(message: dict[str, Any]) -> dict[str, Any]:
    """Remove the ``_context_*`` items from ``message`` and return them without prefix."""
    keys = [k for k in message if k.startswith(CONTEXT_PREFIX)]
    return {k[len(CONTEXT_PREFIX) :]: message.pop(k) for k in keys}


def serialize_remote_exception(exc: BaseException) -> str:
    """oslo's failure string for ``exc``: class, module, message, tb, args, kwargs."""
    cls = type(exc)
    name = cls.__name__.removesuffix(_REMOTE_SUFFIX)
    module = cls.__module__.removesuffix(_REMOTE_SUFFIX)
    module = _WIRE_MODULES.get(module, module)
    kwargs = getattr(exc, "kwargs", None)
    data: dict[str, Any] = {
        "class": name,
        "module": module,
        "message": str(exc),
        "tb": traceback.format_exception(exc),
        "args": list(exc.args),
        "kwargs": kwargs if isinstance(kwargs, dict) else {},
    }
    try:
        return dumps(data)
    except (TypeError, ValueError):
        # Arguments that are not JSON-friendly: keep the message, which is what callers read.
        data["args"] = [str(exc)]
        data["kwargs"] = {}
        return dumps(data)


def deserialize_remote_exception(
    failure: str | Mapping[str, Any], allowed_remote_exmods: Iterable[str]
) -> Exception:
    """The exception a caller raises for a failure reply.

    The original class when its module is ``builtins``/``exceptions``/ours or listed in
    ``allowed_remote_exmods`` and it can be rebuilt from ``args``/``kwargs`` (or the class of the
    same name in an allowed module that names the sender's module in its
    ``FORMER_REMOTE_EXMODS``); ``RemoteError`` otherwise. The remote traceback is attached as
    ``remote_traceback`` and as a note.
    """
    data: Any = failure
    if isinstance(failure, str):
        try:
            data = _loads(failure)
        except MalformedMessage:
            return RemoteError("MalformedFailure", failure[:1000], None)
    if not isinstance(data, Mapping):
        return RemoteError("MalformedFailure", repr(data)[:1000], None)
    name = str(data.get("class", "Exception"))
    module = str(data.get("module", "builtins"))
    message = str(data.get("message", ""))
    tb = data.get("tb")
    tb_lines = [str(line) for line in tb] if isinstance(tb, list) else None
    args = data.get("args", [])
    kwargs = data.get("kwargs", {})

    exc = _rebuild(module, name, args, kwargs, allowed_remote_exmods)
    if exc is None:
        return RemoteError(name, message, tb_lines)
    remote_tb = "".join(tb_lines or [])
    try:
        exc.remote_traceback = tb_lines  # type: ignore[attr-defined]
    except AttributeError:
        pass  # a class with __slots__: the note below still carries it
    if remote_tb:
        exc.add_note("Remote traceback:\n" + remote_tb.rstrip())
    return exc


def _successor(module: str, allowed: Iterable[str]) -> str | None:
    """The allowed module that now holds the classes ``module`` had, by the same names.

    A module declares the modules it replaces in ``FORMER_REMOTE_EXMODS`` (peers of older
    releases still send errors from those): the former module itself is never imported, so a
    peer cannot make a caller load code it does not allow.
    """
    for candidate in sorted(allowed):
        try:
            mod = importlib.import_module(candidate)
        except ImportError:
            continue
        if module in getattr(mod, "FORMER_REMOTE_EXMODS", ()):
            return candidate
    return None


def _rebuild(
    module: str, name: str, args: Any, kwargs: Any, allowed: Iterable[str]
) -> Exception | None:
    if module not in ALWAYS_ALLOWED_EXMODS and module not in set(allowed):
        successor = _successor(module, allowed)
        if successor is None:
            return None
        module = successor
    if not isinstance(args, list) or not isinstance(kwargs, dict) or name.startswith("_"):
        return None
    if not all(isinstance(k, str) for k in kwargs):
        return None
    if module == "exceptions":
        module = "builtins"
    module = _LOCAL_MODULES.get(module, module)
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    klass = getattr(mod, name, None)
    # Only Exception subclasses: a peer must never make us raise SystemExit or CancelledError.
    if not isinstance(klass, type) or not issubclass(klass, Exception):
        return None
    try:
        return klass(*args, **kwargs)
    except Exception:  # any constructor failure means "cannot rebuild": fall back to RemoteError
        return None
