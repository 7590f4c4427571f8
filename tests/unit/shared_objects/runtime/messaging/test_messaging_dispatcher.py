"""Dispatch rules: namespace, version, exposure, privacy."""

from __future__ import annotations

from typing import Any

import pytest

from shared_objects.runtime.messaging import NoSuchMethod, Target, UnsupportedVersion, expose
from shared_objects.runtime.messaging.dispatcher import Dispatcher


class V1:
    target = Target(version="1.3")

    @expose
    async def ping(self, ctxt: Any) -> str:
        return "v1"

    async def not_exposed(self, ctxt: Any) -> str:
        return "hidden"

    @expose
    async def _private(self, ctxt: Any) -> str:
        return "private"


class V2:
    target = Target(version="2.1")

    @expose
    async def ping(self, ctxt: Any) -> str:
        return "v2"


class Other:
    target = Target(namespace="other", version="1.0")

    @expose
    async def other_ping(self, ctxt: Any) -> str:
        return "other"


class NoTarget:
    @expose
    async def legacy(self, ctxt: Any) -> str:
        return "legacy"


@pytest.fixture
def dispatcher() -> Dispatcher:
    return Dispatcher([V1(), V2(), Other(), NoTarget()])


def test_version_selects_the_compatible_endpoint(dispatcher: Dispatcher) -> None:
    assert dispatcher.lookup("ping", None, "1.2").__self__.__class__ is V1  # type: ignore[attr-defined]
    assert dispatcher.lookup("ping", None, "2.0").__self__.__class__ is V2  # type: ignore[attr-defined]


def test_missing_version_means_1_0(dispatcher: Dispatcher) -> None:
    assert dispatcher.lookup("legacy", None, None).__self__.__class__ is NoTarget  # type: ignore[attr-defined]
    assert dispatcher.lookup("ping", None, None).__self__.__class__ is V1  # type: ignore[attr-defined]


def test_requested_minor_above_served_is_unsupported(dispatcher: Dispatcher) -> None:
    with pytest.raises(UnsupportedVersion):
        dispatcher.lookup("ping", None, "2.2")
    with pytest.raises(UnsupportedVersion):
        dispatcher.lookup("ping", None, "3.0")


def test_namespace_must_match(dispatcher: Dispatcher) -> None:
    assert dispatcher.lookup("other_ping", "other", "1.0")
    with pytest.raises(NoSuchMethod):
        dispatcher.lookup("other_ping", None, "1.0")
    with pytest.raises(UnsupportedVersion):
        dispatcher.lookup("ping", "unknown-namespace", "1.0")


@pytest.mark.parametrize(
    "name", ["not_exposed", "_private", "__class__", "__init__", "target", "missing"]
)
def test_only_exposed_public_methods_are_callable(dispatcher: Dispatcher, name: str) -> None:
    with pytest.raises(NoSuchMethod):
        dispatcher.lookup(name, None, "1.0")


def test_garbage_version_is_unsupported(dispatcher: Dispatcher) -> None:
    with pytest.raises(UnsupportedVersion):
        dispatcher.lookup("ping", None, "one.two")


def test_endpoint_with_invalid_target_version_fails_at_construction() -> None:
    class Bad:
        target = Target(version="x")

    with pytest.raises(ValueError):
        Dispatcher([Bad()])
