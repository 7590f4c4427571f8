"""Loading the configuration: defaults, then the TOML file, then ``FLEET_*`` variables; the
validation, and the helpers services and tools use (``--config``, ``--print-config``)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qsl

from shared_objects.runtime.config._checks import FALSE_WORDS, TRUE_WORDS, check_host
from shared_objects.runtime.config.sections import FleetConfig
from shared_objects.runtime.url_secrets import mask_url, split_authority


class ConfigError(ValueError):
    """The configuration cannot be used; ``str(error)`` is one line that names the key."""


# Short environment names for the options people set most; each maps to (section, key).
ENV_ALIASES: dict[str, tuple[str | None, str]] = {
    "FLEET_HOST": (None, "host"),
    "FLEET_TRANSPORT_URL": ("messaging", "transport_url"),
    "FLEET_CONTROL_EXCHANGE": ("messaging", "control_exchange"),
    "FLEET_DATABASE_URL": ("database", "url"),
    "FLEET_LOG_FORMAT": ("logging", "format"),
    "FLEET_LOG_LEVEL": ("logging", "level"),
    "FLEET_METRICS_HOST": ("service", "metrics_host"),
    "FLEET_METRICS_PORT": ("service", "metrics_port"),
    "FLEET_COMPUTE_VERSION_CAP": ("upgrade_levels", "compute"),
    "FLEET_STATE_DIR": ("compute", "state_dir"),
    # The name releases before 1.2 read directly; the upgrade tests set it for every release.
    "FLEET_TRACE_OBJECT_VERSIONS": ("logging", "trace_object_versions"),
}
# Variables of releases before 1.2, read by their own readers, now options of a section: a
# process refuses them (naming the replacement) rather than silently ignoring a setting.
RETIRED_ENV_PREFIXES: dict[str, str] = {
    "FLEET_LIVE_MIGRATION_": "live_migration",
    "FLEET_LIVE_MIGRATE_": "live_migration",
    "FLEET_FAKE_": "compute",
}
# Retired variables whose option has another name: (prefix, old key) -> (section, key).
_RETIRED_RENAMED = {
    ("FLEET_FAKE_", "cpu_ratio"): ("compute", "cpu_allocation_ratio"),
    ("FLEET_FAKE_", "ram_ratio"): ("compute", "ram_allocation_ratio"),
    ("FLEET_FAKE_", "disk_ratio"): ("compute", "disk_allocation_ratio"),
    ("FLEET_LIVE_MIGRATE_", "service_down_time"): ("service", "service_down_time"),
}
ENV_PREFIX = "FLEET_"
CONFIG_FILE_ENV = "FLEET_CONFIG"


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(FleetConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(FleetConfig) if f.name != "host"}


def _field(cls: type, key: str) -> tuple[dataclasses.Field[Any], type] | None:
    for f in dataclasses.fields(cls):
        if f.name == key:
            return f, typing.get_type_hints(cls)[key]
    return None


def _convert(name: str, kind: type, value: Any, *, from_env: bool) -> Any:
    """``value`` as ``kind`` (str/int/float/bool/tuple of str), or ConfigError naming ``name``."""
    if kind == tuple[str, ...]:
        # A list: comma-separated in the environment, a TOML array of strings in a file.
        if from_env:
            return tuple(item.strip() for item in str(value).split(",") if item.strip())
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
    if from_env:
        text = str(value).strip()
        if kind is bool:
            if text.lower() in TRUE_WORDS:
                return True
            if text.lower() in FALSE_WORDS:
                return False
            raise ConfigError(f"{name}: expected a boolean (true/false), got {text!r}")
        if kind is int:
            try:
                return int(text, 10)
            except ValueError:
                raise ConfigError(f"{name}: expected an integer, got {text!r}") from None
        if kind is float:
            try:
                number = float(text)
            except ValueError:
                raise ConfigError(f"{name}: expected a number, got {text!r}") from None
            if not math.isfinite(number):
                raise ConfigError(f"{name}: expected a finite number, got {text!r}")
            return number
        return str(value)
    # From TOML: the file already has types; accept an int where a float is wanted, nothing else.
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected a boolean (true/false), got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if isinstance(value, str):
        return value
    raise ConfigError(f"{name}: expected a string, got {value!r}")


# Where each option was last set ("/etc/fleet/fleet.toml: [service] metrics_port", "FLEET_..."),
# so that a value that fails validation is reported under the name the user actually typed.
Origins = dict[tuple[str | None, str], str]


def _assign(
    cfg: FleetConfig,
    section: str | None,
    key: str,
    value: Any,
    origin: str,
    origins: Origins,
    *,
    from_env: bool,
) -> None:
    """Set one option; ``origin`` is how the error message names it (file key or variable)."""
    target: Any = cfg if section is None else getattr(cfg, section)
    found = _field(type(target), key)
    if found is None or (section is None and key != "host"):
        raise ConfigError(f"{origin}: unknown option")
    field, kind = found
    try:
        converted = _convert(origin, kind, value, from_env=from_env)
    except ConfigError:
        if not field.metadata.get("secret"):
            raise
        # The value may hold a password: name the key, not the value.
        raise ConfigError(
            f"{origin}: expected a string (value not shown: may hold a secret)"
        ) from None
    setattr(target, key, converted)
    origins[(section, key)] = origin


def _apply_file(cfg: FleetConfig, path: Path, origins: Origins) -> None:
    # Imported here: most processes (fleetctl, the tests) read no file, and its parser costs
    # a few ms of start-up (bench/cli.py).
    import tomllib

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except PermissionError:
        raise ConfigError(f"config file {path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path}: is a directory") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
    sections = _sections()
    for name, value in data.items():
        if name == "host":
            _assign(cfg, None, "host", value, f"{path}: host", origins, from_env=False)
        elif name in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: [{name}] must be a table")
            for key, item in value.items():
                _assign(cfg, name, key, item, f"{path}: [{name}] {key}", origins, from_env=False)
        else:
            raise ConfigError(f"{path}: unknown section or option {name!r}")


def _check_retired(env: Mapping[str, str]) -> None:
    """A retired variable alone is refused (it would be silently lost); beside its
    replacement it is ignored."""
    for var in sorted(env):
        if "__" in var:
            continue
        for prefix, section in RETIRED_ENV_PREFIXES.items():
            if var.startswith(prefix):
                key = var[len(prefix) :].lower()
                section, key = _RETIRED_RENAMED.get((prefix, key), (section, key))
                if f"FLEET_{section.upper()}__{key.upper()}" in env:
                    # Both names set: an environment shared by two releases during a rolling
                    # upgrade (the old name for the older agents). The new name wins.
                    continue
                raise ConfigError(
                    f"{var}: no longer read; set [{section}] {key} instead "
                    f"(FLEET_{section.upper()}__{key.upper()})"
                )


def _apply_env(cfg: FleetConfig, env: Mapping[str, str], origins: Origins) -> None:
    sections = _sections()
    _check_retired(env)
    # Generic names first, aliases last: the short name is the one people type by hand.
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        section, _, key = var[len(ENV_PREFIX) :].lower().partition("__")
        if section not in sections:
            raise ConfigError(f"{var}: unknown section {section!r}")
        _assign(cfg, section, key, env[var], var, origins, from_env=True)
    for var, (alias_section, alias_key) in ENV_ALIASES.items():
        if var in env:
            _assign(cfg, alias_section, alias_key, env[var], var, origins, from_env=True)


def _validate(cfg: FleetConfig, origins: Origins) -> None:
    groups: list[tuple[str | None, Any]] = [(None, cfg)]
    groups += [(name, getattr(cfg, name)) for name in _sections()]
    for section, obj in groups:
        for f in dataclasses.fields(obj):
            check = f.metadata.get("check")
            if check is None:
                continue
            error = check(getattr(obj, f.name))
            if error:
                default = f.name if section is None else f"[{section}] {f.name}"
                where = origins.get((section, f.name), default)
                raise ConfigError(f"{where}: {error}")
    if cfg.service.service_down_time <= cfg.service.report_interval:
        raise ConfigError(
            "[service] service_down_time: must be greater than report_interval "
            f"({cfg.service.service_down_time:g} <= {cfg.service.report_interval:g}), "
            "or every service would look down between two reports"
        )
    _check_tls_policy(cfg, origins)


# (section, option holding a file name, option the file's content replaces)
SECRET_FILE_OPTIONS = (
    ("messaging", "transport_url_file", "transport_url"),
    ("database", "url_file", "url"),
)


def _read_secret_files(cfg: FleetConfig, origins: Origins) -> None:
    """Replace each URL by the content of its ``*_file`` option, when that option is set."""
    for section, file_key, key in SECRET_FILE_OPTIONS:
        obj = getattr(cfg, section)
        path = getattr(obj, file_key)
        if not path:
            continue
        file_origin = origins.get((section, file_key), f"[{section}] {file_key}")
        if (section, key) in origins:
            raise ConfigError(
                f"{file_origin}: {origins[(section, key)]} is set too; set only one of them"
            )
        try:
            text = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8"
            raise ConfigError(f"{file_origin}: cannot read {path}: {reason}") from None
        if not text or "\n" in text:
            raise ConfigError(f"{file_origin}: {path} must hold exactly one line (the URL)")
        setattr(obj, key, text)
        origins[(section, key)] = f"{file_origin} ({path})"


def _check_tls_policy(cfg: FleetConfig, origins: Origins) -> None:
    """Certificate verification can be turned off only explicitly (``tls_insecure``)."""
    url = cfg.messaging.transport_url
    options = dict(parse_qsl(split_authority(url.partition("://")[2])[1].partition("?")[2]))
    if options.get("no_verify_ssl", "0") not in ("", "0") and not cfg.messaging.tls_insecure:
        where = origins.get(("messaging", "transport_url"), "[messaging] transport_url")
        raise ConfigError(
            f"{where}: no_verify_ssl turns off the broker certificate check; refused unless "
            "[messaging] tls_insecure = true"
        )


def load_config(
    environ: Mapping[str, str] | None = None, path: str | os.PathLike[str] | None = None
) -> FleetConfig:
    """The effective configuration: defaults, then the TOML file, then ``FLEET_*`` variables.

    ``path`` wins over ``$FLEET_CONFIG``; with neither, no file is read. Raises ``ConfigError``.
    """
    env = os.environ if environ is None else environ
    cfg = FleetConfig()
    origins: Origins = {}
    file_path = path if path is not None else env.get(CONFIG_FILE_ENV) or None
    if file_path is not None:
        _apply_file(cfg, Path(file_path), origins)
    _apply_env(cfg, env, origins)
    if not cfg.compute.state_dir:
        # systemd's StateDirectory= hands the service its directory in $STATE_DIRECTORY.
        state = env.get("STATE_DIRECTORY", "").split(":")[0]
        cfg.compute.state_dir = state or "fleet-state"
    _read_secret_files(cfg, origins)
    _validate(cfg, origins)
    return cfg


def load_config_or_exit(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    prog: str | None = None,
) -> FleetConfig:
    """``load_config`` for a program's ``main``: on error print one line to stderr, exit 2."""
    try:
        return load_config(environ, path=path)
    except ConfigError as exc:
        _exit_config_error(exc, prog)


def _exit_config_error(exc: ConfigError, prog: str | None) -> NoReturn:
    name = prog or Path(sys.argv[0]).name or "fleet"
    print(f"{name}: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the standard ``--config PATH`` and ``--print-config`` options to a service's parser."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help=f"TOML configuration file (default: ${CONFIG_FILE_ENV}, else built-in defaults)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration (secrets masked) and exit",
    )


def config_from_args(
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    prog: str | None = None,
) -> FleetConfig:
    """The config named by ``args``: exit 2 on error; print it and exit 0 for --print-config.

    A ``--host`` option, where the program has one, overrides the config (and is what
    ``--print-config`` shows: exactly what would run)."""
    cfg = load_config_or_exit(getattr(args, "config", None), environ, prog)
    host = getattr(args, "host", None)
    if host is not None:
        error = check_host(host)
        if error is not None:
            _exit_config_error(ConfigError(f"--host: {error}"), prog)
        cfg.host = host
    if getattr(args, "print_config", False):
        sys.stdout.write(format_config(cfg))
        raise SystemExit(0)
    return cfg


def _toml_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def format_config(cfg: FleetConfig) -> str:
    """The effective configuration as TOML text, passwords masked (for ``--print-config``)."""
    lines = [f"host = {_toml_value(cfg.host)}"]
    for section in _sections():
        obj = getattr(cfg, section)
        lines.append("")
        lines.append(f"[{section}]")
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("secret"):
                value = mask_url(value)
            lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def option_names() -> Sequence[tuple[str | None, str]]:
    """Every (section, key) the loader accepts; docs and examples are tested against it."""
    names: list[tuple[str | None, str]] = [(None, "host")]
    for section, cls in _sections().items():
        names += [(section, f.name) for f in dataclasses.fields(cls)]
    return names
