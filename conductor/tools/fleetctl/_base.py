"""What every ``fleetctl`` module shares and that costs nothing to import: the errors a command
raises, the exit statuses, and the argument checks.

Kept free of the RPC runtime, the objects and the database (they load in ~0.5 s): ``fleetctl
--help`` and a usage error never import them (``bench/cli.py`` measures it).
"""

from __future__ import annotations

import argparse
import enum
import uuid as uuidlib


class Exit(enum.IntEnum):
    """``fleetctl``'s exit statuses (docs/operations.md, "fleetctl")."""

    OK = 0
    #: The request was made and failed: refused, not found, wrong state, a boot or a live
    #: migration that ended in error, a schema not at head (``db version``).
    FAILED = 1
    #: Bad usage (arguments) or a configuration that cannot be used; nothing was sent.
    USAGE = 2
    #: The broker cannot be reached or refused this login (down, wrong password, no vhost, TLS).
    BROKER = 3
    #: No conductor answered in time.
    NO_CONDUCTOR = 4
    #: The database cannot be used (``fleetctl db``: refused, no such database or role).
    DATABASE = 5
    #: Interrupted (Ctrl-C).
    INTERRUPTED = 130


class CommandError(Exception):
    """A failure to report as one line on stderr, with exit status ``code``."""

    def __init__(self, message: str, code: int = Exit.FAILED) -> None:
        super().__init__(message)
        self.code = int(code)


class UsageError(CommandError):
    """A bad argument found after parsing (exit 2, nothing sent)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, Exit.USAGE)


def is_uuid(value: str) -> bool:
    try:
        uuidlib.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return False
    return True


def check_uuid(value: str) -> str:
    """The canonical form of ``value``, or a ``UsageError`` naming it."""
    try:
        return str(uuidlib.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise UsageError(f"{value!r} is not a valid UUID") from None


# Argument types: argparse prints their ArgumentTypeError message as is (a ValueError would
# make it print the function's name).


def name(text: str) -> str:
    """A non-empty name without surrounding blanks or control characters."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    if text != text.strip() or any(ord(c) < 32 for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} has surrounding blanks or control characters")
    if len(text) > 255:
        raise argparse.ArgumentTypeError("longer than 255 characters")
    return text


def _integer(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{what}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _integer(text, 1, "must be an integer of at least 1")


def non_negative_int(text: str) -> int:
    return _integer(text, 0, "must be an integer of at least 0")


def port(text: str) -> int:
    value = _integer(text, 0, "must be a port number (0-65535)")
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0-65535), got {value}")
    return value


def seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def uuid_arg(text: str) -> str:
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid UUID") from None
