"""Counting the agents' object calls on their way to the conductor (shared by flow tests)."""

from __future__ import annotations

import collections
from collections.abc import Collection
from typing import Any

from shared_objects.base import FleetObject


class CountingIndirection:
    """Counts the object calls of the agents' conductor clients, as ``(object, method)``.
    ``watched`` (when given) is what ``watched()`` reports."""

    def __init__(self, watched: Collection[tuple[str, str]] | None = None) -> None:
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self._watched = watched

    def watched(self) -> dict[tuple[str, str], int]:
        return {
            call: n
            for call, n in self.calls.items()
            if self._watched is None or call in self._watched
        }

    def wrap(self, api: Any) -> None:
        """Count the calls of one agent's conductor client (each agent has its own, under its
        own login: the one its tasks use)."""
        class_call, instance_call = api.object_class_action_versions, api.object_action

        async def object_class_action_versions(
            context: Any, objname: str, objmethod: str, *rest: Any
        ) -> Any:
            self.calls[(objname, objmethod)] += 1
            return await class_call(context, objname, objmethod, *rest)

        async def object_action(
            context: Any, objinst: FleetObject, objmethod: str, *rest: Any
        ) -> Any:
            self.calls[(objinst.obj_name(), objmethod)] += 1
            return await instance_call(context, objinst, objmethod, *rest)

        api.object_class_action_versions = object_class_action_versions
        api.object_action = object_action
