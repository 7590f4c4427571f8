"""Layer rules, checked by importing in a fresh interpreter.

An agent host never gets a database, so the agent process must not load the conductor's code
or its database drivers; the shared contract (objects, context, exceptions, releases, the RPC
clients) must not load either service; the virt driver must not load the messaging runtime, so
a driver stays usable (and testable) without a broker; and a conductor that receives an older
agent's driver error loads no agent code to rebuild it. A violation shows up here as the list of
modules that came in, and would otherwise show up only as a slower, heavier agent start.

The service plumbing (``shared_objects.runtime``) must not load the objects, so it stays
usable below them; and a service process loads neither the operator tooling nor the
test support.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The shared contract: what both services and tools may import.
CONTRACT = (
    "shared_objects.objects",
    "shared_objects.base",
    "shared_objects.fields",
    "shared_objects.context",
    "shared_objects.exception",
    "shared_objects.releases",
    "shared_objects.upgrade_levels",
    "shared_objects.serializer",
    "shared_objects.policy",
    "shared_objects.notifications",
    "shared_objects.startup_checks",
    "shared_objects.version",
    "shared_objects.rpc_clients.conductor",
    "shared_objects.rpc_clients.compute_task",
    "shared_objects.rpc_clients.compute",
)
SERVICES = ("conductor", "compute_agent")
DATABASE = ("conductor", "sqlalchemy", "asyncpg", "alembic", "aiosqlite")
MESSAGING = ("shared_objects.runtime.messaging", "aio_pika", "aiormq", "pamqp", "oslo_messaging")

_PROBE = """
import importlib, json, sys
files = [importlib.import_module(name).__file__ for name in sys.argv[1:]]
print(json.dumps({"files": files, "loaded": sorted(sys.modules)}))
"""


def _probe(script: str, *argv: str) -> dict[str, Any]:
    """What ``script`` prints last (JSON), run in a fresh interpreter on this tree."""
    env = dict(os.environ)
    # This tree first: the virtualenv may have another checkout installed in editable mode.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", script, *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    probe: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return probe


def _loaded_by(*modules: str) -> list[str]:
    """Every module a fresh interpreter holds after importing ``modules`` from this tree."""
    probe = _probe(_PROBE, *modules)
    # Else the probe would prove nothing about this tree.
    assert all(Path(f).resolve().is_relative_to(ROOT) for f in probe["files"]), probe["files"]
    loaded: list[str] = probe["loaded"]
    return loaded


def _under(loaded: list[str], packages: tuple[str, ...]) -> list[str]:
    return [m for m in loaded if any(m == p or m.startswith(p + ".") for p in packages)]


def test_agent_service_loads_no_conductor_and_no_database() -> None:
    loaded = _loaded_by("compute_agent.service", "compute_agent.__main__")
    assert _under(loaded, DATABASE) == []


def test_contract_loads_no_service() -> None:
    loaded = _loaded_by(*CONTRACT)
    assert _under(loaded, SERVICES) == []
    assert _under(loaded, DATABASE) == []


def test_virt_driver_loads_no_messaging() -> None:
    loaded = _loaded_by(
        "compute_agent.virt", "compute_agent.virt.fake", "compute_agent.virt.loader"
    )
    assert _under(loaded, MESSAGING) == []


_REBUILD_OLD_AGENT_ERROR = """
import json, sys
import conductor.service
from shared_objects.exception import ALLOWED_REMOTE_EXMODS
from shared_objects.runtime.messaging import codec
failure = {"class": "InstanceNotFound", "module": "compute_agent.virt.exceptions",
           "message": "instance u1 not found on this hypervisor", "tb": [],
           "args": ["instance u1 not found on this hypervisor"], "kwargs": {"uuid": "u1"}}
exc = codec.deserialize_remote_exception(json.dumps(failure), ALLOWED_REMOTE_EXMODS)
print(json.dumps({"rebuilt": f"{type(exc).__module__}.{type(exc).__name__}",
                  "loaded": sorted(sys.modules)}))
"""


def test_conductor_rebuilds_an_old_agents_driver_error_without_agent_code() -> None:
    """A 1.0/1.1 agent still sends its driver's errors (``compute_agent.virt.exceptions``): the
    conductor rebuilds them as the contract's class of that name, importing nothing of the
    agent's (its allowed remote modules list only the contract)."""
    probe = _probe(_REBUILD_OLD_AGENT_ERROR)
    assert probe["rebuilt"] == "shared_objects.exception.InstanceNotFound"
    assert _under(probe["loaded"], ("compute_agent",)) == []


# Packages split by part, whose modules import each other one way only (their docstrings say
# which): a cycle would make the import order decide whether a module loads at all.
ONE_WAY_PACKAGES = ("compute_agent.live_migration", "conductor.tasks.live_migration")


def _package_modules(package: str) -> list[str]:
    folder = ROOT.joinpath(*package.split("."))
    names = [package]
    names += [f"{package}.{p.stem}" for p in sorted(folder.glob("*.py")) if p.stem != "__init__"]
    return names


def _imports_within(package: str) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}``, read from the source."""
    modules = _package_modules(package)
    graph: dict[str, set[str]] = {}
    for module in modules:
        parts = module.split(".")
        path = ROOT.joinpath(*parts).with_suffix(".py")
        if module == package:
            path = ROOT.joinpath(*parts, "__init__.py")
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                # "from package import module" names a submodule too.
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[module] = {t for t in targets if t in modules and t != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that ends where it began), or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for target in sorted(graph[node]):
            found = visit(target, [*path, node])
            if found:
                return found
        done.add(node)
        return None

    for start in sorted(graph):
        found = visit(start, [])
        if found:
            return found
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("package", ONE_WAY_PACKAGES)
def test_split_packages_have_no_import_cycle(package: str) -> None:
    graph = _imports_within(package)
    assert len(graph) > 3, graph  # else the package was not found or not split
    assert _cycle(graph) is None, _cycle(graph)


@pytest.mark.parametrize(
    "module", [m for package in ONE_WAY_PACKAGES for m in _package_modules(package)]
)
def test_each_part_imports_first_in_a_fresh_interpreter(module: str) -> None:
    # With a cycle, which module comes first decides whether the import fails.
    assert module in _loaded_by(module)


# The service plumbing: what a process runs on, below the objects (its test kit aside).
RUNTIME = tuple(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in sorted((ROOT / "shared_objects" / "runtime").rglob("*.py"))
    if p.stem != "testing"
)
OBJECTS = (
    "shared_objects.objects",
    "shared_objects.base",
    "shared_objects.serializer",
    "shared_objects.rpc_clients",
    "oslo_versionedobjects",
)


def test_runtime_loads_no_objects_and_no_service() -> None:
    """The runtime carries the contract but is not built on it: it reads only the contract's leaf
    modules (context, exceptions, releases, version), so it stays usable without the objects."""
    assert len(RUNTIME) > 20, RUNTIME  # else the package was not found
    loaded = _loaded_by(*RUNTIME)
    assert _under(loaded, SERVICES) == []
    assert _under(loaded, DATABASE) == []
    assert _under(loaded, OBJECTS) == []


def test_services_load_no_tools_and_no_test_support() -> None:
    loaded = _loaded_by(
        "conductor.service", "conductor.__main__", "compute_agent.service", "compute_agent.__main__"
    )
    assert _under(loaded, ("conductor.tools", "conductor.testing", "shared_objects.testing")) == []
