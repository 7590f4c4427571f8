"""Counting the agents' object calls on their way to the conductor (shared by flow tests)."""

from __future__ import annotations

import collections
import contextvars
from collections.abc import Collection, Coroutine
from typing import Any, TypeVar

from shared_objects.base import FleetObject

_T = TypeVar("_T")

# Which counter (if any) the running task's calls belong to: a task inherits it from the
# task that started it, so work started before ``only()`` (a build still closing its action, a
# usage flush) never carries it.
_COUNTING: contextvars.ContextVar[CountingIndirection | None] = contextvars.ContextVar(
    "counting_indirection", default=None
)


class CountingIndirection:
    """Counts the object calls of the agents' conductor clients, as ``(object, method)``.
    ``watched`` (when given) is what ``watched()`` reports."""

    def __init__(self, watched: Collection[tuple[str, str]] | None = None) -> None:
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self._watched = watched
        self._scoped = False

    def watched(self) -> dict[tuple[str, str], int]:
        return {
            call: n
            for call, n in self.calls.items()
            if self._watched is None or call in self._watched
        }

    async def only(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Await ``coro``, and from now on count only the calls made by it and by the tasks it
        starts, not those of work already running on the same client."""
        self._scoped = True
        token = _COUNTING.set(self)
        try:
            return await coro
        finally:
            _COUNTING.reset(token)

    def _count(self, call: tuple[str, str]) -> None:
        if not self._scoped or _COUNTING.get() is self:
            self.calls[call] += 1

    def wrap(self, api: Any) -> None:
        """Count the calls of one agent's conductor client (each agent has its own, under its
        own login: the one its tasks use)."""
        class_call, instance_call = api.object_class_action_versions, api.object_action

        async def object_class_action_versions(
            context: Any, objname: str, objmethod: str, *rest: Any
        ) -> Any:
            self._count((objname, objmethod))
            return await class_call(context, objname, objmethod, *rest)

        async def object_action(
            context: Any, objinst: FleetObject, objmethod: str, *rest: Any
        ) -> Any:
            self._count((objinst.obj_name(), objmethod))
            return await instance_call(context, objinst, objmethod, *rest)

        api.object_class_action_versions = object_class_action_versions
        api.object_action = object_action
