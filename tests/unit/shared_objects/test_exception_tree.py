"""One exception tree: every error of the contract derives from ``FleetException``, the module's
docstring draws exactly the classes it defines, the errors that used to be defined twice (or
outside the tree) are defined once, and the allowed remote modules are written once."""

from __future__ import annotations

import ast
import functools
import inspect
import re
from pathlib import Path

from shared_objects import exception

ROOT = Path(__file__).resolve().parents[3]
SOURCES = ("shared_objects", "conductor", "compute_agent", "tests", "bench")
# The virt driver keeps its own errors (translated at the agent's RPC boundary).
VIRT = ROOT / "compute_agent" / "virt"


def _defined_here() -> dict[str, type]:
    return {
        name: cls
        for name, cls in inspect.getmembers(exception, inspect.isclass)
        if cls.__module__ == exception.__name__
    }


def _python_files() -> list[Path]:
    return [p for top in SOURCES for p in sorted((ROOT / top).rglob("*.py"))]


@functools.cache
def _parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def test_every_error_of_the_contract_derives_from_the_root() -> None:
    classes = _defined_here()
    assert classes["FleetException"] is exception.FleetException
    for name, cls in classes.items():
        assert issubclass(cls, exception.FleetException), name


def test_the_docstring_draws_every_class_and_only_those() -> None:
    doc = exception.__doc__ or ""
    drawing = doc.split("::", 1)[1].split("\n\n", 2)[1]
    drawn: set[str] = set()
    for line in drawing.splitlines():
        # "├── NotFound   comment": the names come before the comment's double space.
        names = re.sub(r"^[\s│├└─]*", "", line).split("  ", 1)[0]
        drawn.update(n.strip() for n in names.split(",") if n.strip())
    assert drawn == set(_defined_here())


def test_the_drawing_shows_each_class_under_its_base() -> None:
    doc = exception.__doc__ or ""
    drawing = doc.split("::", 1)[1].split("\n\n", 2)[1].splitlines()
    parents: list[str] = []
    for line in drawing:
        stripped = re.sub(r"^[\s│├└─]*", "", line)
        depth = (len(line) - len(stripped)) // 4
        names = [n.strip() for n in stripped.split("  ", 1)[0].split(",") if n.strip()]
        del parents[depth - 1 :]
        for name in names:
            if parents:
                base = getattr(exception, parents[-1])
                assert getattr(exception, name).__bases__ == (base,), (name, parents[-1])
        parents.append(names[0])


def test_errors_once_defined_twice_or_outside_the_tree_are_defined_once() -> None:
    wanted = {"InsufficientResources", "InstanceNotFound", "NoValidHost", "PeerBusy"}
    where: dict[str, list[str]] = {name: [] for name in wanted}
    for path in _python_files():
        if path.is_relative_to(VIRT) or path.is_relative_to(ROOT / "tests"):
            continue
        for node in ast.walk(_parsed(path)):
            if isinstance(node, ast.ClassDef) and node.name in wanted:
                where[node.name].append(str(path.relative_to(ROOT)))
    assert where == {name: ["shared_objects/exception.py"] for name in wanted}


def test_allowed_remote_modules_list_only_the_contract() -> None:
    assert exception.ALLOWED_REMOTE_EXMODS == ("shared_objects.exception",)
    assert not any(
        m.startswith(("compute_agent", "conductor")) for m in exception.ALLOWED_REMOTE_EXMODS
    )


_MODULES = ("shared_objects.exception", "compute_agent.virt.exceptions")


def _names(node: ast.AST) -> set[object]:
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant)}
    return {node.value} if isinstance(node, ast.Constant) else set()


def _exmods_lists(tree: ast.AST) -> list[ast.AST]:
    """Literal values given as allowed remote modules: ``allowed_remote_exmods=[...]``,
    ``allowed_exmods="..."`` or ``SOME_EXMODS = [...]``."""
    found: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg and node.arg.endswith("exmods"):
            found.append(node.value)
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and "EXMODS" in t.id for t in node.targets
        ):
            found.append(node.value)
    return found


def test_allowed_remote_modules_are_written_once() -> None:
    """Every transport of a service, tool, test or bench takes the contract's list: no other
    list allows ``shared_objects.exception``, none allows ``compute_agent.virt.exceptions``."""
    copies = []
    for path in _python_files():
        if path in (ROOT / "shared_objects" / "exception.py", Path(__file__)):
            continue
        tree = _parsed(path)
        agent = [
            n
            for n in ast.walk(tree)
            if isinstance(n, (ast.List, ast.Tuple, ast.Set))
            and "compute_agent.virt.exceptions" in _names(n)
        ]
        contract = [n for n in _exmods_lists(tree) if _names(n) & set(_MODULES)]
        copies += [
            f"{path.relative_to(ROOT)}:{getattr(n, 'lineno', '?')}" for n in agent + contract
        ]
    assert copies == []
