"""Packaging facts operators rely on: one version everywhere, a licence file, pinned
dependencies used by every install path."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from shared_objects import releases
from shared_objects.runtime.metrics import ServiceMetrics
from shared_objects.version import VERSION, describe

ROOT = Path(__file__).resolve().parents[3]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
CONSTRAINTS = ROOT / "constraints.txt"


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def pinned() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pins[name.lower().replace("_", "-").replace(".", "-")] = version
    return pins


def test_the_version_has_one_source() -> None:
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "shared_objects.version.VERSION"
    # major.minor is the release the code carries (its RPC and object manifests).
    assert VERSION.startswith(releases.CURRENT.name + ".")
    assert describe("conductor").startswith(f"conductor {VERSION} (release ")
    assert f'version="{VERSION}"' in ServiceMetrics("conductor").render().decode()


def test_the_installed_metadata_reports_that_version() -> None:
    # An editable install records the version when installed: `make venv` (or pip install -e .)
    # again after a version change.
    assert importlib.metadata.version("fleet") == VERSION


def test_license_file_matches_the_declared_license() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert PYPROJECT["project"]["license"] == {"text": "Apache-2.0"}
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_every_dependency_is_pinned_and_the_project_is_not() -> None:
    pins = pinned()
    wanted = list(PYPROJECT["project"]["dependencies"])
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        wanted += extra
    for requirement in wanted:
        name = _name(requirement).replace(".", "-")
        assert name in pins, f"{requirement} has no pin in constraints.txt"
    assert "fleet" not in pins


def test_every_install_path_uses_the_constraints() -> None:
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text(encoding="utf-8")
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^COPY pyproject\.toml .*constraints\.txt ", dockerfile, flags=re.M)
    assert "-c constraints.txt" in dockerfile
    assert "!constraints.txt" in (ROOT / "deploy" / "Dockerfile.dockerignore").read_text()
    assert "constraints.txt" in (ROOT / "README.md").read_text(encoding="utf-8")
