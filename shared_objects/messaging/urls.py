"""Transport URLs: ``rabbit://u:p@h1:5672,u:p@h2:5672/vhost?opt=v``, ``amqp(s)://``, ``memory://``."""

from __future__ import annotations

import dataclasses
from urllib.parse import parse_qsl, unquote, urlencode

# Query options that only oslo understands; dropped before handing URLs to aio-pika.
_OSLO_ONLY_OPTIONS = frozenset({"ssl", "ssl_version", "kombu_failover_strategy"})
_TRUE = frozenset({"1", "true", "yes", "on"})


@dataclasses.dataclass(frozen=True, slots=True)
class ParsedURL:
    """A transport URL split into the per-host AMQP URLs aio-pika can connect to."""

    scheme: str  # "amqp", "amqps" or "memory"
    hosts: tuple[str, ...]  # one aio-pika URL per broker host, in failover order
    users: tuple[str | None, ...]  # login user per host (the AMQP user_id to publish with)
    virtual_host: str


def parse_transport_url(url: str, *, heartbeat: int | None = None) -> ParsedURL:
    """Split ``url``; ``heartbeat`` (seconds) is added unless the URL sets it."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"transport URL {url!r} has no scheme")
    scheme = scheme.lower()
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    options = dict(parse_qsl(query, keep_blank_values=True))
    if scheme == "memory":
        user, at, name = netloc.rpartition("@")
        return ParsedURL("memory", (name or "default",), (unquote(user) if at else "guest",), path)
    if scheme not in {"rabbit", "amqp", "amqps", "rabbits"}:
        raise ValueError(f"unsupported transport URL scheme {scheme!r}")
    tls = scheme in {"amqps", "rabbits"} or options.get("ssl", "").lower() in _TRUE
    out_scheme = "amqps" if tls else "amqp"
    if heartbeat is not None:
        options.setdefault("heartbeat", str(heartbeat))
    clean = {k: v for k, v in options.items() if k not in _OSLO_ONLY_OPTIONS}
    suffix = "/" + path if slash else "/"
    if clean:
        suffix += "?" + urlencode(clean)
    hosts: list[str] = []
    users: list[str | None] = []
    for host in (h for h in netloc.split(",") if h):
        hosts.append(f"{out_scheme}://{host}{suffix}")
        creds, at, _ = host.rpartition("@")
        users.append(unquote(creds.partition(":")[0]) if at and creds else None)
    if not hosts:
        hosts.append(f"{out_scheme}://guest:guest@localhost{suffix}")
        users.append("guest")
    return ParsedURL(out_scheme, tuple(hosts), tuple(users), unquote(path) or "/")
