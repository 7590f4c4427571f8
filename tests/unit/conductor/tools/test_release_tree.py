"""Exporting a release's code from git: the recorded one works, a missing one fails clearly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from conductor.tools.release_tree import (
    ReleaseHistoryMissing,
    export_release_sync,
    previous_release,
)
from shared_objects import releases


def test_previous_release_is_recorded_and_exports(tmp_path: Path) -> None:
    release = previous_release()
    assert release.commit, "a released entry must name its commit"
    tree = export_release_sync(release, tmp_path)
    assert (tree / "compute_agent" / "__main__.py").is_file()
    assert f'name="{release.name}"' in (tree / "shared_objects" / "releases.py").read_text()


def test_a_commit_missing_from_history_is_a_clear_error(tmp_path: Path) -> None:
    ghost = dataclasses.replace(releases.RELEASES[0], commit="0" * 40)
    with pytest.raises(ReleaseHistoryMissing, match="not in the git history"):
        export_release_sync(ghost, tmp_path)


def test_a_release_without_a_commit_cannot_be_exported(tmp_path: Path) -> None:
    with pytest.raises(ReleaseHistoryMissing, match="no recorded commit"):
        export_release_sync(releases.CURRENT, tmp_path)


def test_fleetctl_runs_by_the_name_each_tree_has(tmp_path: Path) -> None:
    """The local cluster runs ``fleetctl db upgrade`` from an earlier release's tree too, where
    fleetctl may still have its former module name (``conductor.cli`` before 1.2)."""
    from conductor.tools.cluster import _fleetctl_module

    tree = export_release_sync(previous_release(), tmp_path)
    module = _fleetctl_module(tree)
    assert (tree / module.replace(".", "/") / "__main__.py").is_file(), module
    assert _fleetctl_module(None) == "conductor.tools.fleetctl"
