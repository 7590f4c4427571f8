"""Mixed-release fleets: the previous release's real code, exported from git, beside this one."""

from __future__ import annotations

from pathlib import Path

import pytest

from conductor.release_tree import ReleaseHistoryMissing, export_release_sync, previous_release


@pytest.fixture(scope="session")
def previous_release_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's source tree; a clear failure (never a skip) without history."""
    try:
        release = previous_release()
    except ReleaseHistoryMissing as exc:
        pytest.fail(str(exc))
    dest = tmp_path_factory.mktemp(f"release-{release.name}")
    try:
        return export_release_sync(release, dest)
    except ReleaseHistoryMissing as exc:
        pytest.fail(f"upgrade tests need the git history of release {release.name}: {exc}")
