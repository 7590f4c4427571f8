"""The shipped examples and the operations guide stay in step with the config loader."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from shared_objects.runtime.config import ENV_ALIASES, load_config, option_names

ROOT = Path(__file__).resolve().parents[3]
TOML_EXAMPLE = ROOT / "deploy" / "fleet.toml.example"
ENV_EXAMPLE = ROOT / "deploy" / "fleet.env.example"
OPERATIONS = ROOT / "docs" / "operations.md"
# "#key = value" (no space after '#') marks an option shown at its default.
COMMENTED_OPTION = re.compile(r"^#(?P<key>[a-z_]+) = (?P<value>.*)$")


def uncommented_example(tmp_path: Path) -> tuple[Path, list[tuple[str | None, str]]]:
    """The example with every option line enabled, and the (section, key) pairs it contains."""
    lines, seen = [], []
    section: str | None = None
    for line in TOML_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        match = COMMENTED_OPTION.match(line)
        if match:
            line = line[1:]
            seen.append((section, match["key"]))
        lines.append(line)
    path = tmp_path / "fleet.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, seen


def test_toml_example_lists_every_option_once(tmp_path: Path) -> None:
    _, seen = uncommented_example(tmp_path)
    assert sorted(seen, key=str) == sorted(option_names(), key=str)


def test_toml_example_shows_the_real_defaults(tmp_path: Path) -> None:
    path, _ = uncommented_example(tmp_path)
    from_example = load_config({}, path=path)
    defaults = load_config({})
    for section, key in option_names():
        if section is None:
            continue  # host defaults to the machine's name; the example shows a sample
        got = getattr(getattr(from_example, section), key)
        want = getattr(getattr(defaults, section), key)
        assert got == want, f"[{section}] {key}: example says {got!r}, default is {want!r}"


def test_toml_example_as_shipped_loads_cleanly() -> None:
    cfg = load_config({}, path=TOML_EXAMPLE)
    assert cfg == dataclasses.replace(load_config({}), host=cfg.host)


def test_env_example_loads_and_documents_every_short_name() -> None:
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    active = dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert "FLEET_TRANSPORT_URL" in active
    load_config(active)
    documented = set(re.findall(r"^#\s+(FLEET_[A-Z_]+)\s", text, flags=re.M))
    assert documented == set(ENV_ALIASES)


def test_operations_guide_documents_every_option_and_variable() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    for section, key in option_names():
        assert f"`{key}`" in text, f"docs/operations.md misses [{section}] {key}"
    for var in ENV_ALIASES:
        assert var in text, f"docs/operations.md misses {var}"


def test_env_example_logs_each_host_in_as_itself() -> None:
    from urllib.parse import urlsplit

    from shared_objects.runtime.identity import Identities, Role

    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    active = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    cfg = load_config(active)
    identities = Identities(cfg.security)
    login = urlsplit(active["FLEET_TRANSPORT_URL"]).username
    assert login == identities.login_for_host(active["FLEET_HOST"]) == f"fleet-host-{cfg.host}"
    # The conductor variant, commented out, is a conductor login of its own.
    [conductor_url] = re.findall(r"^#FLEET_TRANSPORT_URL=(\S+)$", "\n".join(lines), flags=re.M)
    conductor = urlsplit(conductor_url).username
    assert identities.resolve(conductor).role is Role.CONDUCTOR
    assert {login, conductor}.isdisjoint({"guest", "fleet", "admin"})


def test_version_caps_shown_as_examples_are_accepted() -> None:
    # Every quoted version the example's [upgrade_levels] section and the docs' row for
    # [upgrade_levels] compute offer (the docs once showed "6.2", which no release speaks).
    example = TOML_EXAMPLE.read_text(encoding="utf-8")
    section = example.split("[upgrade_levels]", 1)[1].split("\n[", 1)[0]
    row = next(
        line
        for line in OPERATIONS.read_text(encoding="utf-8").splitlines()
        if line.startswith("| `compute` |")
    )
    shown = set(re.findall(r'["`](auto|\d+\.\d+)["`]', section + row))
    assert {"auto", "1.2"} <= shown
    for value in shown:
        assert load_config({"FLEET_COMPUTE_VERSION_CAP": value}).upgrade_levels.compute == value
