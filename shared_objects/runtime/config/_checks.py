"""Validators of option values: each takes the converted value and returns an error text (the
loader prefixes it with the key as the user wrote it) or None."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl

from shared_objects.runtime.url_secrets import HostPart, mask_url, split_authority

# The words the environment may use for booleans (and URL options such as ssl=).
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


# A validator receives the already type-converted value and returns an error text or None.
Check = Callable[[Any], "str | None"]


def meta(check: Check | None = None, secret: bool = False) -> dict[str, Any]:
    return {"check": check, "secret": secret}


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be >= {low:g}, got {v!r}"


def between(low: int, high: int) -> Check:
    return lambda v: None if low <= v <= high else f"must be {low}..{high}, got {v!r}"


def positive(v: float) -> str | None:
    return None if v > 0 else f"must be > 0, got {v!r}"


def port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else f"must be a TCP port 0..65535, got {v!r}"


def one_of(*choices: str) -> Check:
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}; got {v!r}"

    return check


def non_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


# The schemes shared_objects.runtime.messaging.urls accepts ("rabbits"/"amqps" mean TLS).
TRANSPORT_SCHEMES = ("rabbit", "rabbits", "amqp", "amqps", "memory")
DATABASE_SCHEMES = ("sqlite+aiosqlite", "postgresql+asyncpg")


def check_hostports(parts: Sequence[HostPart]) -> str | None:
    """Each ``host[:port]``; errors show the host part only, never the user-info before it."""
    for part in parts:
        hostport = part.hostport
        if hostport.startswith("["):
            host, _, after = hostport[1:].partition("]")
            port = after[1:]
            if after and not after.startswith(":"):
                return f"has a bad host:port {hostport!r}"
        else:
            host, _, port = hostport.partition(":")
        if not host:
            return f"has an empty host in {hostport!r}"
        if port and not (port.isdigit() and int(port) <= 65535):
            return f"has a bad host:port {hostport!r} (the port must be 0..65535)"
    return None


def check_transport_url(url: str) -> str | None:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return f"is not a URL (expected e.g. rabbit://user:pass@127.0.0.1:5672/): {mask_url(url)!r}"
    if scheme.lower() not in TRANSPORT_SCHEMES:
        return f"scheme must be one of {', '.join(TRANSPORT_SCHEMES)}; got {scheme!r}"
    if scheme.lower() == "memory":
        return None
    parts, tail = split_authority(rest)
    if not parts:
        error = None  # oslo.messaging's "rabbit:///": guest@localhost, the runtime's default
    else:
        # oslo.messaging allows several brokers: rabbit://u:p@h1:5672,u:p@h2:5672/vhost
        error = check_hostports(parts)
    if error:
        return error
    options = dict(parse_qsl(tail.partition("?")[2], keep_blank_values=True))
    auth = options.get("auth", "plain").lower()
    if auth not in ("plain", "external"):
        return f"auth must be plain or external; got {auth!r}"
    tls = scheme.lower() in ("amqps", "rabbits") or options.get("ssl", "").lower() in TRUE_WORDS
    if auth == "external" and not (tls and options.get("certfile")):
        return "auth=external (x509 client-certificate login) needs TLS (amqps://) and certfile="
    if options.get("keyfile") and not options.get("certfile"):
        return "keyfile= is given without certfile="
    return None


# libpq's sslmode values; "verify-ca"/"verify-full" check the server certificate.
DATABASE_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def check_database_url(url: str) -> str | None:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return f"is not a URL (expected e.g. sqlite+aiosqlite:///fleet.db): {mask_url(url)!r}"
    if scheme not in DATABASE_SCHEMES:
        return f"scheme must be one of {', '.join(DATABASE_SCHEMES)}; got {scheme!r}"
    if scheme.startswith("postgresql"):
        parts, tail = split_authority(rest)
        path, _, query = tail.partition("?")
        options = dict(parse_qsl(query, keep_blank_values=True))
        if len(parts) > 1:
            return f"names several hosts ({len(parts)}); Fleet connects to one: {mask_url(url)!r}"
        if not parts or not parts[0].hostport:
            if "host" not in options:
                return f"has no host: {mask_url(url)!r}"
        else:
            error = check_hostports(parts)
            if error:
                return error
        if not path.strip("/"):
            return f"names no database: {mask_url(url)!r}"
        if "sslmode" in options and "ssl" in options:
            return "sets both sslmode= and ssl=; use sslmode="
        mode = options.get("sslmode", options.get("ssl"))
        if mode is not None and mode not in DATABASE_SSLMODES:
            return f"sslmode must be one of {', '.join(DATABASE_SSLMODES)}; got {mode!r}"
    return None


def check_version_cap(v: str) -> str | None:
    # The same rule as shared_objects.upgrade_levels.parse_level, checked here so that a level
    # no release knows is a configuration error (and --print-config shows none).
    from shared_objects import releases

    known = {"auto"} | {r.name for r in releases.RELEASES}
    known |= {r.compute_rpc_api for r in releases.RELEASES}
    if v in known:
        return None
    choices = ", ".join(sorted(known))
    return f"must be one of {choices} (auto, a release name or a compute RPC version); got {v!r}"


def check_host(v: str) -> str | None:
    if not v.strip():
        return "must not be empty"
    # The host name becomes part of queue names and routing keys.
    if any(c.isspace() for c in v):
        return f"must be a host name without spaces; got {v!r}"
    return None


def check_login_patterns(v: tuple[str, ...]) -> str | None:
    if not v:
        return "must name at least one login (pattern)"
    bad = [p for p in v if not p.strip() or any(c.isspace() for c in p)]
    return f"login patterns must be non-empty and without spaces; got {bad!r}" if bad else None


def check_login_prefix(v: str) -> str | None:
    if not v or any(c.isspace() or c in "*?[]" for c in v):
        return f"must be a non-empty login prefix without spaces or wildcards; got {v!r}"
    return None


def check_hosts(v: tuple[str, ...]) -> str | None:
    bad = [h for h in v if check_host(h)]
    return f"must be host names; got {bad!r}" if bad else None
