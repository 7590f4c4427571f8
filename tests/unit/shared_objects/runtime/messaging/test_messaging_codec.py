"""Wire codec: envelope, context keys and oslo's remote-exception format."""

from __future__ import annotations

import datetime
import json

import pytest

from shared_objects.context import RequestContext
from shared_objects.runtime.messaging import codec
from shared_objects.runtime.messaging.exceptions import (
    MalformedMessage,
    NoSuchMethod,
    RemoteError,
    UnsupportedEnvelopeVersion,
    UnsupportedVersion,
)


class CustomError(Exception):
    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.kwargs = {"code": code}


def test_envelope_round_trip_is_double_encoded_like_oslo() -> None:
    inner = {"method": "ping", "args": {"a": [1, "two", {"three": 3.0}]}, "_msg_id": "m1"}
    body = codec.encode_message(inner)
    outer = json.loads(body)
    assert outer["oslo.version"] == "2.0"
    assert isinstance(outer["oslo.message"], str)
    assert json.loads(outer["oslo.message"]) == inner
    assert codec.decode_message(body) == inner


def test_bare_dict_without_envelope_is_accepted() -> None:
    assert codec.decode_message(b'{"method": "x"}') == {"method": "x"}


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe not json",
        b"",
        b"[1, 2]",
        b'"text"',
        b"{" * 100_000,
        b'{"oslo.version": "2.0", "oslo.message": 5}',
        b'{"oslo.version": "2.0", "oslo.message": "[1]"}',
        b'{"oslo.version": "2.0", "oslo.message": "{bad"}',
    ],
)
def test_undecodable_bodies_raise_malformed_message(body: bytes) -> None:
    with pytest.raises(MalformedMessage):
        codec.decode_message(body)


def test_unknown_envelope_version_keeps_inner_message_for_the_error_reply() -> None:
    body = json.dumps(
        {"oslo.version": "3.0", "oslo.message": json.dumps({"_msg_id": "m", "_reply_q": "q"})}
    )
    with pytest.raises(UnsupportedEnvelopeVersion) as info:
        codec.decode_message(body.encode())
    assert info.value.version == "3.0"
    assert info.value.message == {"_msg_id": "m", "_reply_q": "q"}


def test_datetimes_sets_are_encoded_like_oslo_jsonutils() -> None:
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, 6)
    out = json.loads(codec.dumps({"t": when, "s": {1}}))
    assert out == {"t": "2026-01-02T03:04:05.000006", "s": [1]}


def test_context_travels_as_prefixed_keys_and_comes_back() -> None:
    ctxt = RequestContext(request_id="req-1", user_id="u", project_id="p", roles=["r"])
    packed = codec.pack_context(ctxt)
    assert packed["_context_request_id"] == "req-1"
    assert packed["_context_user"] == "u"
    assert "_context_caller" not in packed
    message = {"method": "m", **packed}
    values = codec.unpack_context(message)
    assert message == {"method": "m"}
    rebuilt = RequestContext.from_dict(values, caller="host1")
    assert (rebuilt.request_id, rebuilt.user_id, rebuilt.roles, rebuilt.caller) == (
        "req-1",
        "u",
        ["r"],
        "host1",
    )


def _raise(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as caught:
        return caught


def test_failure_format_has_oslo_keys() -> None:
    failure = json.loads(codec.serialize_remote_exception(_raise(ValueError("bad value"))))
    assert failure["class"] == "ValueError"
    assert failure["module"] == "builtins"
    assert failure["message"] == "bad value"
    assert failure["args"] == ["bad value"]
    assert failure["kwargs"] == {}
    assert failure["tb"][-1] == "ValueError: bad value\n"


def test_builtin_exception_is_recreated_with_remote_traceback() -> None:
    failure = codec.serialize_remote_exception(_raise(KeyError("k")))
    exc = codec.deserialize_remote_exception(failure, [])
    assert type(exc) is KeyError
    assert exc.args == ("k",)
    assert "KeyError" in "".join(exc.remote_traceback)  # type: ignore[attr-defined]


def test_allowed_module_exception_is_recreated_with_kwargs() -> None:
    failure = codec.serialize_remote_exception(_raise(CustomError("nope", code=7)))
    exc = codec.deserialize_remote_exception(failure, [__name__])
    assert type(exc) is CustomError
    assert str(exc) == "nope"
    assert exc.kwargs == {"code": 7}  # type: ignore[attr-defined]


def test_exception_from_a_module_not_allowed_becomes_remote_error() -> None:
    failure = codec.serialize_remote_exception(_raise(CustomError("nope")))
    exc = codec.deserialize_remote_exception(failure, [])
    assert isinstance(exc, RemoteError)
    assert exc.exc_type == "CustomError"
    assert exc.value == "nope"


# This module stands in for one that replaced another: errors older peers send from
# ``old_errors_module`` are rebuilt from here, by class name.
FORMER_REMOTE_EXMODS = ("old_errors_module",)


def test_an_error_of_a_former_module_is_rebuilt_from_the_module_that_replaced_it() -> None:
    failure = {
        "class": "CustomError",
        "module": "old_errors_module",
        "message": "moved",
        "args": ["moved"],
        "kwargs": {"code": 3},
    }
    exc = codec.deserialize_remote_exception(json.dumps(failure), [__name__])
    assert type(exc) is CustomError
    assert exc.kwargs == {"code": 3}  # type: ignore[attr-defined]
    # Only through an allowed module that names it; a class it lacks stays remote.
    assert isinstance(codec.deserialize_remote_exception(json.dumps(failure), []), RemoteError)
    missing = {**failure, "class": "NotHere"}
    exc = codec.deserialize_remote_exception(json.dumps(missing), [__name__])
    assert isinstance(exc, RemoteError) and exc.exc_type == "NotHere"


def test_fleet_messaging_exceptions_round_trip_with_their_arguments() -> None:
    exc = codec.deserialize_remote_exception(
        codec.serialize_remote_exception(NoSuchMethod("frob")), []
    )
    assert type(exc) is NoSuchMethod and exc.method == "frob"
    exc = codec.deserialize_remote_exception(
        codec.serialize_remote_exception(UnsupportedVersion("9.0", "m")), []
    )
    assert type(exc) is UnsupportedVersion and exc.version == "9.0"


@pytest.mark.parametrize(
    "failure",
    [
        {"class": "SystemExit", "module": "builtins", "message": "x", "args": []},
        {"class": "KeyboardInterrupt", "module": "builtins", "message": "x", "args": []},
        {"class": "ValueError", "module": "builtins", "message": "x", "args": "notalist"},
        {"class": "NoSuchThing", "module": "builtins", "message": "x", "args": []},
        {"class": "_private", "module": "builtins", "message": "x", "args": []},
        {
            "class": "NoSuchMethod",
            "module": "shared_objects.messaging.exceptions",
            "message": "x",
            "args": [1, 2, 3],
        },
    ],
)
def test_unrebuildable_failures_become_remote_error(failure: dict[str, object]) -> None:
    exc = codec.deserialize_remote_exception(json.dumps(failure), [])
    assert isinstance(exc, RemoteError)
    assert exc.exc_type == failure["class"]


def test_garbage_failure_string_becomes_remote_error() -> None:
    assert isinstance(codec.deserialize_remote_exception("not json", []), RemoteError)


def test_remote_suffix_is_stripped_when_re_raising() -> None:
    remote_cls = type("ValueError_Remote", (ValueError,), {"__module__": "builtins_Remote"})
    failure = json.loads(codec.serialize_remote_exception(_raise(remote_cls("x"))))
    assert (failure["class"], failure["module"]) == ("ValueError", "builtins")


def test_unserialisable_exception_args_fall_back_to_the_message() -> None:
    failure = json.loads(codec.serialize_remote_exception(_raise(ValueError(object()))))
    assert len(failure["args"]) == 1 and failure["args"][0].startswith("<object")


def test_runtime_errors_keep_their_wire_module() -> None:
    """Peers of 1.0 and 1.1 allow and import ``shared_objects.messaging.exceptions``: the runtime's
    errors are still sent under that name and rebuilt from it, though the module moved."""
    failure = json.loads(codec.serialize_remote_exception(_raise(NoSuchMethod("frob"))))
    assert failure["module"] == "shared_objects.messaging.exceptions"
    assert NoSuchMethod.__module__ == "shared_objects.runtime.messaging.exceptions"
    exc = codec.deserialize_remote_exception(json.dumps(failure), [])
    assert type(exc) is NoSuchMethod
