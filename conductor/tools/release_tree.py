"""Exporting an earlier release's real code from git history, to run it beside this one.

The release table records the commit each release was cut at; ``export_release`` writes that
commit's tree into a directory. Upgrade tests and ``make demo-upgrade`` run the old release's
``compute-agent`` from there (see ``conductor.tools.cluster.ClusterSpec.agent_source``) — the
previous release's own code, not today's code pretending to be old.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from shared_objects import releases
from shared_objects.releases import Release


class ReleaseHistoryMissing(RuntimeError):
    """The commit of a release is not in this clone (a shallow clone, or rewritten history)."""


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _git(*argv: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *argv], cwd=cwd, capture_output=True, timeout=120)


def export_release_sync(release: Release, dest: Path, *, repo: Path | None = None) -> Path:
    """Write the tree of ``release.commit`` into ``dest`` (created); returns ``dest``."""
    repo = repo or _repo_root()
    if not release.commit:
        raise ReleaseHistoryMissing(f"release {release.name} has no recorded commit")
    probe = _git("cat-file", "-e", f"{release.commit}^{{commit}}", cwd=repo)
    if probe.returncode != 0:
        shallow = _git("rev-parse", "--is-shallow-repository", cwd=repo).stdout.strip()
        hint = (
            " This clone is shallow: run `git fetch --unshallow`."
            if shallow == b"true"
            else " Clone the repository with its full history."
        )
        raise ReleaseHistoryMissing(
            f"release {release.name} was cut at commit {release.commit}, which is not in the "
            f"git history of {repo}.{hint}"
        )
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(
        ["git", "archive", "--format=tar", release.commit], cwd=repo, stdout=subprocess.PIPE
    )
    untar = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, timeout=120)
    if archive.stdout is not None:
        archive.stdout.close()
    if archive.wait(timeout=120) != 0 or untar.returncode != 0:
        raise ReleaseHistoryMissing(f"could not export commit {release.commit} of {repo}")
    return dest


async def export_release(release: Release, dest: Path, *, repo: Path | None = None) -> Path:
    """``export_release_sync`` off the event loop."""
    return await asyncio.to_thread(export_release_sync, release, dest, repo=repo)


def previous_release() -> Release:
    """The release before the one being developed (what a rolling upgrade starts from)."""
    if len(releases.RELEASES) < 2:
        raise ReleaseHistoryMissing("the release table has no previous release")
    return releases.RELEASES[-2]
