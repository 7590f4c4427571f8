"""Mixed-release fleets: earlier releases' real code, exported from git, beside this one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conductor.tools.release_tree import (
    ReleaseHistoryMissing,
    export_release_sync,
    previous_release,
)
from shared_objects import releases


@pytest.fixture(scope="session")
def release_tree(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``release_tree("1.0")``: that release's source tree (exported once per session); a clear
    failure (never a skip) without the git history."""
    trees: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in trees:
            release = releases.by_name(name)
            dest = tmp_path_factory.mktemp(f"release-{release.name}")
            try:
                trees[name] = export_release_sync(release, dest)
            except ReleaseHistoryMissing as exc:
                pytest.fail(f"upgrade tests need the git history of release {name}: {exc}")
        return trees[name]

    return get


@pytest.fixture(scope="session")
def previous_release_tree(release_tree: Callable[[str], Path]) -> Path:
    """The previous release's source tree (what a rolling upgrade starts from)."""
    try:
        release = previous_release()
    except ReleaseHistoryMissing as exc:
        pytest.fail(str(exc))
    return release_tree(release.name)
