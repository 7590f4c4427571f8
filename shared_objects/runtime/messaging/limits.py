"""Limits checked on a received body before any JSON decoding: size and nesting depth.

A peer controls every byte of what it sends. Python's ``json`` decodes recursively (a deep
nesting ends in ``RecursionError`` after a thousand C frames) and holds the whole document in
memory as Python objects (several times the body), so both are bounded first, with work that is
linear in the body and runs in C (no Python loop over bytes):

- size: ``len(body)`` against ``max_message_bytes``;
- depth: escapes are removed, every byte but quotes and brackets is deleted
  (``bytes.translate``), what is left of the strings is cut out, then innermost ``[]`` pairs are
  removed pass after pass: the number of passes is the depth, and we stop after ``max_depth``
  (at most ``max_depth`` passes over the body: ~15 ms per pass for 8 MiB of brackets).

``reply_address`` finds where an error reply to a refused request goes without decoding it: a
bounded look at the head and the tail of the body for the ``_reply_q`` / ``_msg_id`` keys. What
it finds is no more trusted than a decoded request's fields: a reply is still published only to a
reply queue name (``topology.reply_route``), through the normal reply path and permissions.
"""

from __future__ import annotations

import dataclasses
import re

from shared_objects.runtime.messaging.exceptions import (
    MalformedMessage,
    MessageTooDeep,
    MessageTooLarge,
)

# After escapes are gone and only quotes and brackets are left, a string literal is two quotes
# with brackets (or nothing) between them.
_STRING = re.compile(rb'"[^"]*"')
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')

# Where the reply address of a refused request is looked for: oslo and Fleet both put
# ``_msg_id``/``_reply_q`` after the (possibly huge) arguments, before the small context.
_SCAN_WINDOW = 64 * 1024
# The key, then its string value, at one level of JSON escaping (the 2.0 envelope) or none (a
# bare 1.0 dict). Values are capped in length: no AMQP queue name is longer than 255 bytes.
_ADDRESS = re.compile(rb'\\?"(_reply_q|_msg_id)\\?": ?\\?"([^"\\\s]{1,255})\\?"')


@dataclasses.dataclass(frozen=True, slots=True)
class MessageLimits:
    """The bounds a received body must satisfy before it is decoded."""

    max_bytes: int
    max_depth: int

    def check_size(self, size: int) -> None:
        """Raise ``MessageTooLarge`` when ``size`` bytes exceed ``max_bytes``."""
        if size > self.max_bytes:
            raise MessageTooLarge(size, self.max_bytes)

    def check_depth(self, data: bytes) -> None:
        """Raise ``MessageTooDeep`` when the JSON text ``data`` nests deeper than
        ``max_depth``, ``MalformedMessage`` when it does not balance."""
        problem = nesting_problem(data, self.max_depth)
        if problem == "too deep":
            raise MessageTooDeep(self.max_depth)
        if problem is not None:
            raise MalformedMessage("body is not valid JSON: unbalanced brackets or quotes")

    def check(self, body: bytes) -> None:
        """Both checks, size first (it costs nothing)."""
        self.check_size(len(body))
        self.check_depth(body)


def nesting_exceeds(data: bytes, max_depth: int) -> bool:
    """True when the JSON text ``data`` nests arrays/objects deeper than ``max_depth``, or when
    its brackets or quotes do not balance (then it is not JSON either)."""
    return nesting_problem(data, max_depth) is not None


def nesting_problem(data: bytes, max_depth: int) -> str | None:
    """``"too deep"``, ``"unbalanced"`` (brackets or quotes: not JSON) or None (fine)."""
    if b"[" not in data and b"{" not in data:
        return None
    if b"\\" in data:
        # Escapes live only inside strings and pair up left to right, as replace() scans: after
        # this every quote left opens or closes a string.
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = data.translate(_BRACKETS, _NOT_STRUCTURE)
    if b'"' in structure:
        if structure.count(b'"') % 2:
            return "unbalanced"  # an unterminated string
        # Most strings hold no bracket and are now just "": drop those pairs in one C pass
        # (a pair that closes one string and opens the next merges two strings: still fine).
        structure = structure.replace(b'""', b"")
        if b'"' in structure:
            structure = _STRING.sub(b"", structure)
    if b"[" * (max_depth + 1) in structure:
        return "too deep"  # the common deep attack, found in one search
    depth = 0
    while structure:
        depth += 1
        if depth > max_depth:
            return "too deep"
        inner = structure.replace(b"[]", b"")
        if len(inner) == len(structure):
            return "unbalanced"  # no innermost pair left
        structure = inner
    return None


def scan_keys(body: bytes) -> dict[str, str]:
    """The ``_reply_q`` / ``_msg_id`` string values found in the head and tail windows of a body
    that will not be decoded (the last occurrence wins: the envelope's own keys come after the
    arguments or the result)."""
    if len(body) <= 2 * _SCAN_WINDOW:
        windows = [body]
    else:
        windows = [body[:_SCAN_WINDOW], body[-_SCAN_WINDOW:]]
    found: dict[str, str] = {}
    for window in windows:
        for match in _ADDRESS.finditer(window):
            found[match.group(1).decode()] = match.group(2).decode()
    return found


def reply_address(body: bytes) -> tuple[str, str] | None:
    """``(_reply_q, _msg_id)`` of a request that will not be decoded, or None if either is not
    found within the bounded windows."""
    found = scan_keys(body)
    queue, msg_id = found.get("_reply_q"), found.get("_msg_id")
    if queue is None or msg_id is None:
        return None
    return queue, msg_id
