"""Client-side TLS for the broker and the database: contexts, certificate logins, errors.

One place decides what "verified TLS" means for Fleet: the peer's certificate chains to the
configured CA (or the system trust store when none is given), and, unless explicitly relaxed,
its name matches the host Fleet connected to (``check_hostname``; IP addresses are matched
against the certificate's IP subjectAltNames). TLS 1.2 is the minimum.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterable

__all__ = [
    "TLSConfigError",
    "all_loopback",
    "certificate_login",
    "client_context",
    "describe_tls_failure",
    "is_loopback",
]


class TLSConfigError(ValueError):
    """A CA, certificate or key file cannot be used; one line, no secrets."""


def client_context(
    *,
    cafile: str | None = None,
    capath: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    verify: bool = True,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A client ``SSLContext``: server certificate verified against ``cafile``/``capath`` (or
    the system store), host name checked; ``certfile``/``keyfile`` is this client's own
    certificate (x509 login). ``verify=False`` turns every check off (callers log that)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cafile or capath:
        try:
            context.load_verify_locations(cafile=cafile or None, capath=capath or None)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot load CA {cafile or capath}: {_reason(exc)}") from None
    if certfile:
        try:
            context.load_cert_chain(certfile, keyfile or None)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(
                f"cannot load client certificate {certfile} (key {keyfile or certfile}): "
                f"{_reason(exc)}"
            ) from None
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif not check_hostname:
        context.check_hostname = False
    return context


def certificate_login(certfile: str) -> str:
    """The common name (CN) of the PEM certificate in ``certfile``: the login RabbitMQ derives
    from a client certificate with ``ssl_cert_login_from = common_name``."""
    # The standard library has no public certificate parser; this helper (used by CPython's own
    # tests since 3.x) reads a PEM file into getpeercert()'s dict form.
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        raise TLSConfigError("cannot read certificate subjects here: put the login in the URL")
    try:
        info = decode(certfile)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot read certificate {certfile}: {_reason(exc)}") from None
    for rdn in info.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    raise TLSConfigError(f"certificate {certfile} has no common name (CN) to log in with")


def is_loopback(host: str | None) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (and a Unix socket path)."""
    if not host:
        return True  # no host: a Unix socket or the library's local default
    host = host.strip("[]")
    if host.startswith("/") or host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def all_loopback(hosts: Iterable[str | None]) -> bool:
    return all(is_loopback(host) for host in hosts)


def describe_tls_failure(exc: BaseException) -> str | None:
    """A one-line description when ``exc`` (or what caused it) is a TLS failure, else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            detail = current.verify_message or _reason(current)
            return f"TLS certificate verification failed: {detail}"
        if isinstance(current, ssl.SSLError):
            return f"TLS handshake failed: {_reason(current)}"
        current = current.__cause__ or current.__context__
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__
