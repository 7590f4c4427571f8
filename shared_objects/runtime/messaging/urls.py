"""Transport URLs: ``rabbit://u:p@h1:5672,u:p@h2:5672/vhost?opt=v``, ``amqp(s)://``, ``memory://``.

TLS: ``amqps://`` / ``rabbits://`` or ``?ssl=1``. The broker's certificate is always verified
(against ``?cafile=`` / ``?capath=``, else the system trust store) and its name checked against
the host of the URL; ``?no_verify_ssl=1`` turns that off and is refused unless
``[messaging] tls_insecure = true``. ``?certfile=&keyfile=`` present a client certificate;
with ``?auth=external`` it is also the login (SASL EXTERNAL): no password, and the login (the
AMQP ``user_id`` Fleet publishes with) is the URL's user if given, else the certificate's common
name (RabbitMQ's ``ssl_cert_login_from = common_name``).

User-info is split at the last ``@`` of each host part (``shared_objects.runtime.url_secrets``), so
passwords containing ``/ , @ : ?`` work even unencoded; they are percent-encoded again for
aio-pika.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import parse_qsl, quote, unquote, urlencode

from shared_objects.runtime.tls import certificate_login
from shared_objects.runtime.url_secrets import split_authority

# Query options that only oslo understands; dropped before handing URLs to aio-pika.
_OSLO_ONLY_OPTIONS = frozenset({"ssl", "ssl_version", "kombu_failover_strategy"})
# TLS options Fleet turns into its own SSLContext (aiormq's names); not passed on either.
_TLS_OPTIONS = frozenset({"cafile", "capath", "cadata", "certfile", "keyfile", "no_verify_ssl"})
_TRUE = frozenset({"1", "true", "yes", "on"})
AUTH_MECHANISMS = ("plain", "external")


@dataclasses.dataclass(frozen=True, slots=True)
class TLSOptions:
    """How to build the client SSLContext for a TLS transport URL."""

    cafile: str | None = None
    capath: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True  # False only with ?no_verify_ssl=1


@dataclasses.dataclass(frozen=True, slots=True)
class ParsedURL:
    """A transport URL split into the per-host AMQP URLs aio-pika can connect to."""

    scheme: str  # "amqp", "amqps" or "memory"
    hosts: tuple[str, ...]  # one aio-pika URL per broker host, in failover order
    users: tuple[str | None, ...]  # login user per host (the AMQP user_id to publish with)
    virtual_host: str
    tls: TLSOptions | None = None  # None: plain AMQP
    auth: str = "plain"  # "plain" (user/password) or "external" (client certificate)
    hostnames: tuple[str, ...] = ()  # the host of each entry of ``hosts``


def parse_transport_url(url: str, *, heartbeat: int | None = None) -> ParsedURL:
    """Split ``url``; ``heartbeat`` (seconds) is added unless the URL sets it.

    Raises ``ValueError`` (never echoing user-info) for an unusable URL."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("transport URL has no scheme (expected e.g. rabbit://...)")
    scheme = scheme.lower()
    parts, tail = split_authority(rest)
    path_part, _, query = tail.partition("?")
    path = path_part[1:] if path_part.startswith("/") else path_part
    slash = path_part.startswith("/")
    options = dict(parse_qsl(query, keep_blank_values=True))
    if scheme == "memory":
        user = parts[0].user if parts and parts[0].userinfo is not None else None
        name = parts[0].hostport if parts else ""
        return ParsedURL(
            "memory", (name or "default",), (unquote(user) if user else "guest",), path
        )
    if scheme not in {"rabbit", "amqp", "amqps", "rabbits"}:
        raise ValueError(f"unsupported transport URL scheme {scheme!r}")
    tls_on = scheme in {"amqps", "rabbits"} or options.get("ssl", "").lower() in _TRUE
    out_scheme = "amqps" if tls_on else "amqp"
    auth = options.get("auth", "plain").lower()
    if auth not in AUTH_MECHANISMS:
        raise ValueError(f"transport URL: auth must be plain or external, not {auth!r}")
    tls: TLSOptions | None = None
    if tls_on:
        tls = TLSOptions(
            cafile=options.get("cafile") or None,
            capath=options.get("capath") or None,
            certfile=options.get("certfile") or None,
            keyfile=options.get("keyfile") or None,
            verify=options.get("no_verify_ssl", "0") in ("", "0"),
        )
    if auth == "external" and (tls is None or tls.certfile is None):
        raise ValueError("transport URL: auth=external needs TLS (amqps://) and certfile=")
    if heartbeat is not None:
        options.setdefault("heartbeat", str(heartbeat))
    clean = {
        k: (v if k != "auth" else auth)
        for k, v in options.items()
        if k not in _OSLO_ONLY_OPTIONS and k not in _TLS_OPTIONS
    }
    suffix = "/" + path if slash else "/"
    if clean:
        suffix += "?" + urlencode(clean)
    cert_login: str | None = None
    hosts: list[str] = []
    users: list[str | None] = []
    hostnames: list[str] = []
    for part in (p for p in parts if p.userinfo is not None or p.hostport):
        user = unquote(part.user) if part.user else None
        password = unquote(part.password) if part.password is not None else None
        if auth == "external":
            if user is None:
                assert tls is not None and tls.certfile is not None
                cert_login = cert_login or certificate_login(tls.certfile)
                user = cert_login
            creds = ""  # the certificate is the credential; no password goes on the wire
        elif user is None:
            creds = ""
        else:
            creds = quote(user, safe="")
            if password is not None:
                creds += ":" + quote(password, safe="")
            creds += "@"
        hosts.append(f"{out_scheme}://{creds}{part.hostport}{suffix}")
        users.append(user)
        hostnames.append(_hostname(part.hostport))
    if not hosts:
        if auth == "external":
            assert tls is not None and tls.certfile is not None
            hosts.append(f"{out_scheme}://localhost{suffix}")
            users.append(certificate_login(tls.certfile))
        else:
            hosts.append(f"{out_scheme}://guest:guest@localhost{suffix}")
            users.append("guest")
        hostnames.append("localhost")
    return ParsedURL(
        out_scheme,
        tuple(hosts),
        tuple(users),
        unquote(path) or "/",
        tls=tls,
        auth=auth,
        hostnames=tuple(hostnames),
    )


def _hostname(hostport: str) -> str:
    if hostport.startswith("["):
        return hostport[1:].partition("]")[0]
    return hostport.partition(":")[0]
