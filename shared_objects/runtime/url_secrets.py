"""Split the authority of a URL whose passwords may be written without percent-encoding.

``scheme://user:pass@host:port,user:pass@host:port/path?query``: a password typed by hand may
contain ``/``, ``,``, ``@``, ``:``, ``?`` unencoded, which ``urllib.parse`` cuts in the wrong
place (and then echoes part of the password in its error messages). Host names cannot contain
``@``: the user-info of a host part runs up to the *last* ``@`` that is followed by something
shaped like ``host[:port]`` and then ``,``, ``/``, ``?``, ``#`` or the end. An ``@`` in the query
(a certificate path) does not count when an earlier one qualifies.

Truly ambiguous text (a password containing ``@host,``) is split at that ``,``: percent-encode
such passwords. Masking errs on the side of hiding too much, never too little.

No imports from the rest of Fleet: ``shared_objects.runtime.config`` and the messaging URL parser
both use this module.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = ["HostPart", "mask_url", "split_authority"]

# A host (name, IPv4, [IPv6]) with an optional port, possibly empty ("rabbit://u:p@/").
_HOST = r"(?:\[[0-9A-Fa-f:.%a-z]*\]|[A-Za-z0-9._~%-]*)(?::[^,/?#@]*)?"
_HOST_AT_END = re.compile(_HOST + r"(?=[,/?#]|$)")
_MORE_HOSTS = re.compile(r"(?:," + _HOST + r")*(?=[/?#]|$)")
_NETLOC_PLAIN = re.compile(r"[^/?#]*")
# Query options whose values are secrets (libpq's password=, sslpassword=).
_SECRET_QUERY = re.compile(r"(?i)((?:^|[?&;])(?:ssl)?password=)[^&;#]*")


@dataclasses.dataclass(frozen=True, slots=True)
class HostPart:
    """One ``[userinfo@]host[:port]`` of an authority; ``userinfo`` is None without ``@``."""

    userinfo: str | None
    hostport: str

    @property
    def user(self) -> str | None:
        """The user (before the first ``:``), still percent-encoded; None without user-info."""
        return None if self.userinfo is None else self.userinfo.partition(":")[0]

    @property
    def password(self) -> str | None:
        """The password (after the first ``:``), still percent-encoded; None if absent."""
        if self.userinfo is None:
            return None
        _, colon, password = self.userinfo.partition(":")
        return password if colon else None

    def masked(self) -> str:
        if self.userinfo is None:
            return self.hostport
        return f"{self.user}{':***' if self.password is not None else ''}@{self.hostport}"


def split_authority(rest: str) -> tuple[list[HostPart], str]:
    """``rest`` (a URL after ``scheme://``) as its host parts and the tail (``/...``, ``?...``
    or empty). Host parts are separated by ``,`` (several brokers in one URL)."""
    candidates = [
        m.start() for m in re.finditer("@", rest) if _HOST_AT_END.match(rest, m.start() + 1)
    ]
    clean = [i for i in candidates if "?" not in rest[:i] and "#" not in rest[:i]]
    chosen = clean or candidates
    if not chosen:
        netloc = _NETLOC_PLAIN.match(rest).group()  # type: ignore[union-attr]
        plain = [HostPart(None, host) for host in netloc.split(",")] if netloc else []
        return plain, rest[len(netloc) :]
    last = chosen[-1]
    match = _HOST_AT_END.match(rest, last + 1)
    assert match is not None
    end = match.end()
    more = _MORE_HOSTS.match(rest, end)
    if more is not None:
        end = more.end()
    netloc, tail = rest[:end], rest[end:]
    parts: list[HostPart] = []
    start = 0
    for at in candidates:
        if at < start or at > last:
            continue
        host = _HOST_AT_END.match(netloc, at + 1)
        if host is None:
            continue
        boundary = host.end()
        if at != last and not netloc.startswith(",", boundary):
            continue  # an "@" inside a password followed by "/" or "?"
        parts.append(HostPart(netloc[start:at], host.group()))
        start = boundary + 1
        if at == last:
            break
    if start < len(netloc):
        parts += [HostPart(None, host) for host in netloc[start:].split(",") if host]
    return parts, tail


def _mask_query(text: str) -> str:
    return _SECRET_QUERY.sub(r"\1***", text)


def mask_url(url: str) -> str:
    """``url`` with every password replaced by ``***`` (several ``user:pass@host`` allowed,
    passwords with unencoded ``/ , @ : ?``), and ``password=`` query values masked too."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        # Not a URL: it might still be a DSN with a password in it; hide anything after "@".
        return _mask_query(url) if "@" not in url else "***"
    parts, tail = split_authority(rest)
    if any(part.password is not None for part in parts):
        # A user without a password beside users with one may be the tail of an ambiguous
        # password ("p@host,rest@host2"): hide it too.
        parts = [
            HostPart("***", p.hostport) if p.userinfo is not None and p.password is None else p
            for p in parts
        ]
    hosts = ",".join(part.masked() for part in parts)
    return f"{scheme}{sep}{hosts}{_mask_query(tail)}"
